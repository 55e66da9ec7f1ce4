"""Mixture-of-experts MLP as two grouped GEMMs over tokens sorted by expert.

Each token picks top_k experts, so there are T * top_k (token, slot) pairs. align_pairs() sorts
them by expert on the device and pads every expert's run to a multiple of BLOCK_M rows, with no
host sync and shapes that depend only on (T, top_k, E), so the whole layer can be captured in a
CUDA graph. Each program of _grouped_gemm_kernel multiplies one BLOCK_M x BLOCK_N tile: BLOCK_M
pairs that all use the same expert, so one expert weight tile serves all of them.

    h = x[pair // top_k] @ w13[e]^T      [T*k, 2I]   (gate | up)
    a = silu(h[:, :I]) * h[:, I:]        [T*k, I]    (kernels/activation.py)
    y = weight[pair] * (a @ w2[e]^T)     [T*k, H]
    out = y.view(T, k, H).sum(1)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_tensor
from kernels.activation import silu_and_mul


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, pair_ids_ptr, block_expert_ptr, weights_ptr,
    n, k, num_pairs,
    stride_am, stride_we, stride_wn, stride_om,
    A_ROWS_PER_PAIR: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # past the last expert's padded run
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)
    valid = (pairs >= 0) & (pairs < num_pairs)
    a_rows = tl.where(valid, pairs // A_ROWS_PER_PAIR, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if SCALE:
        acc *= tl.load(weights_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0)[:, None]
    dst = out_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids [R] int32, -1 in padding rows; expert of each BLOCK_M block [R / block_m] int32,
    -1 past the end) with R = T * top_k + E * (block_m - 1) rounded up to block_m: the pairs
    sorted by expert, each expert's run padded to whole blocks. Device ops only."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first_sorted = torch.cumsum(counts, 0) - counts  # index in `order` of each expert's first pair
    sorted_expert = flat[order]
    dest = (padded_end - padded)[sorted_expert] + torch.arange(num_pairs, device=flat.device) - first_sorted[sorted_expert]
    rows = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    pair_ids = torch.full((rows,), -1, dtype=torch.int32, device=flat.device)
    pair_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pair_ids, block_expert


def _grouped_gemm(a, w, pair_ids, block_expert, num_pairs, rows_per_pair, weights, out_dtype):
    n, k = w.shape[1], w.shape[2]
    out = torch.empty(num_pairs, n, dtype=out_dtype, device=a.device)
    block_m = pair_ids.numel() // block_expert.numel()
    block_n = 64 if a.dtype != torch.float32 else 32
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, pair_ids, block_expert, weights if weights is not None else a,
        n, k, num_pairs,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_ROWS_PER_PAIR=rows_per_pair, SCALE=weights is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32,
    )
    return out


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum over each token's top_k experts e of weight * w2[e] @ silu_and_mul(w13[e] @ x): x [T, H],
    w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, top_k] (float), topk_ids [T, top_k] int.
    Returns [T, H] in x's dtype."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w13", w13, 3, (x.dtype,))
    check_tensor("w2", w2, 3, (x.dtype,))
    check_tensor("topk_weights", topk_weights, 2, FLOAT_DTYPES)
    check_tensor("topk_ids", topk_ids, 2, (torch.int32, torch.int64))
    num_tokens, hidden = x.shape
    num_experts, inter2 = w13.shape[0], w13.shape[1]
    check(w13.shape[2] == hidden and inter2 % 2 == 0, f"w13 must be [E, 2I, {hidden}], got {tuple(w13.shape)}")
    check(tuple(w2.shape) == (num_experts, hidden, inter2 // 2),
          f"w2 must be {(num_experts, hidden, inter2 // 2)}, got {tuple(w2.shape)}")
    check(topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == num_tokens,
          f"topk_ids and topk_weights must both be [{num_tokens}, top_k], got {tuple(topk_ids.shape)} and "
          f"{tuple(topk_weights.shape)}")
    check_same_device(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(x)
    block_m = 16 if num_tokens * top_k <= 64 * num_experts else 64
    pair_ids, block_expert = align_pairs(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    h = _grouped_gemm(x, w13, pair_ids, block_expert, num_pairs, top_k, None, x.dtype)
    y = _grouped_gemm(silu_and_mul(h), w2, pair_ids, block_expert, num_pairs, 1,
                      topk_weights.flatten().float().contiguous(), torch.float32)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Torch reference, one (token, slot) pair at a time in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[t, slot])
            h = w13[e].float() @ x[t].float()
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(topk_weights[t, slot]) * (w2[e].float() @ a)
    return out.to(x.dtype)
