"""Multi-LoRA: y[t] += (x[t] A[s]^T) B[s]^T for each token t with adapter slot s = slots[t]
(s < 0: the base model, y[t] unchanged), as two kernels over the tokens of a mixed batch.

shrink: x [T, K] and A [S, R, K] -> t [T, R] (float32); expand: t and B [S, N, R] -> y [T, N] += .
Each program reads its token's slot and that slot's weights, so one launch serves every
adapter in the batch (no grouping of tokens by adapter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, K, R, stride_x, stride_as, stride_ar, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    rows = tl.where(slot >= 0, R, 0)  # a base-model token reads and writes nothing
    slot = tl.maximum(slot, 0)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + tok * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        mask = (r[:, None] < rows) & (k[None, :] < K)
        a = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
    tl.store(out_ptr + tok * stride_o + r, acc, mask=r < rows)


@triton.jit
def _lora_expand_kernel(t_ptr, b_ptr, slots_ptr, y_ptr, N, R, stride_t, stride_bs, stride_bn, stride_y,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    cols = tl.where(slot >= 0, N, 0)  # a base-model token's row is left as it is
    ranks = tl.where(slot >= 0, R, 0)
    slot = tl.maximum(slot, 0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    s = tl.load(t_ptr + tok * stride_t + r, mask=r < ranks, other=0.0)
    mask = (n[:, None] < cols) & (r[None, :] < ranks)
    b = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + r[None, :], mask=mask, other=0.0)
    delta = tl.sum(b.to(tl.float32) * s[None, :], axis=1)
    y = tl.load(y_ptr + tok * stride_y + n, mask=n < cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * stride_y + n, (y + delta).to(y_ptr.dtype.element_ty), mask=n < cols)


def lora_delta_ref(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
    """Torch reference in float32, one token at a time; returns a new tensor."""
    out = y.float().clone()
    for tok, slot in enumerate(slots.tolist()):
        if slot >= 0:
            out[tok] += (x[tok].float() @ a[slot].float().t()) @ b[slot].float().t()
    return out.to(y.dtype)


def lora_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """y [T, N] += each token's adapter delta, in place: x [T, K], A [S, R, K], B [S, N, R],
    slots [T] int32/int64 (-1: no adapter). Returns y."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("y", y, 2, (x.dtype,))
    check_tensor("a", a, 3, (x.dtype,))
    check_tensor("b", b, 3, (x.dtype,))
    check_tensor("slots", slots, 1, (torch.int32, torch.int64))
    num_tokens, k_dim = x.shape
    num_slots, rank, _ = a.shape
    n_dim = y.shape[1]
    check_shape("y", y, (num_tokens, n_dim))
    check_shape("a", a, (num_slots, rank, k_dim))
    check_shape("b", b, (num_slots, n_dim, rank))
    check_shape("slots", slots, (num_tokens,))
    check(a.stride(2) == 1 and b.stride(2) == 1, "a and b must have contiguous last dims")
    check_same_device(x=x, y=y, a=a, b=b, slots=slots)
    if num_tokens == 0 or rank == 0:
        return y
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = 64 if block_r <= 64 else 32
    block_n = 64 if block_r <= 64 else 32
    shrunk = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(num_tokens,)](
        x, a, slots, shrunk, k_dim, rank, x.stride(0), a.stride(0), a.stride(1), shrunk.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    _lora_expand_kernel[(num_tokens, triton.cdiv(n_dim, block_n))](
        shrunk, b, slots, y, n_dim, rank, shrunk.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )
    return y
