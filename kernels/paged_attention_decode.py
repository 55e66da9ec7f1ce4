"""Decode attention over the paged KV cache: one query token per request.

Decode is memory-bound: every K/V byte of every request is read once per step. One program
handles one (request, KV head, context split) and all query heads of that KV head's group, so
each K/V tile is read from HBM once and used by the whole group (GQA). Long contexts with few
requests are split over several programs (split-K) so the GPU stays full; a small reduce kernel
merges the partial results by their log-sum-exp. With balance_splits each request spreads its
own context over all the splits (a CUDA graph sizes the grid for max_model_len, so fixed
max_model_len-long splits would leave one program doing a short request's whole context).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor, next_pow2
from kernels._paged_tile import attend_tile, cache_dtypes, kv_scales, tile_sizes

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, table_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, tokens_per_split, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_ckv, stride_cblk, stride_coff, stride_ch, stride_bt,
    head_dim, group_size,
    BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, TILE_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, BALANCE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    if BALANCE:  # this request's context in num_splits tile-aligned parts
        tokens_per_split = tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), num_splits), TILE_N) * TILE_N
    start = split * tokens_per_split
    end = tl.minimum(seq_len, start + tokens_per_split)
    g = tl.arange(0, G_PAD)
    heads = kvh * group_size + g
    hmask = g < group_size
    dims = tl.arange(0, D_PAD)
    dmask = dims < head_dim
    b64 = b.to(tl.int64)
    q_mask = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], -1e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    last_pos = tl.full([G_PAD], 0, dtype=tl.int32) + (end - 1)
    table = table_ptr + b64 * stride_bt
    for tile_start in range(start, end, TILE_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, cache_ptr, table, tile_start, end, last_pos, kvh * stride_ch,
            stride_ckv, stride_cblk, stride_coff, qk_scale, dims, dmask, BLOCK_SIZE, TILE_N, IEEE,
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    if not SPLIT:
        dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # partials are [B, H, num_splits, D_PAD] and [B, H, num_splits], contiguous
        row = (b64 * (group_size * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * D_PAD + dims[None, :], out, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=hmask)


@triton.jit
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh, head_dim,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    splits = tl.arange(0, S_PAD)
    smask = splits < num_splits
    dims = tl.arange(0, D_PAD)
    lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=smask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # an empty request: all weights 0
    w = tl.exp2(lse - lse_max)
    parts = tl.load(
        part_out_ptr + (row * num_splits + splits[:, None]) * D_PAD + dims[None, :], mask=smask[:, None], other=0.0
    )
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def paged_attention_decode_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Torch reference (vectorized over requests, float32 math): gather each request's context
    through its block table (an fp8 cache times its scales), mask positions >= seq_len, softmax,
    weight the values."""
    k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    max_len = max(int(seq_lens.max()), 1) if batch else 1
    pos = torch.arange(max_len, device=q.device)
    blocks = block_tables.long()[:, (pos // block_size).clamp(max=block_tables.shape[1] - 1)].clamp(min=0)
    slots = blocks * block_size + pos % block_size  # [B, S]
    keys = kv_cache[0].reshape(-1, num_kv_heads, head_dim)[slots].float() * k_scale  # [B, S, Hkv, D]
    values = kv_cache[1].reshape(-1, num_kv_heads, head_dim)[slots].float() * v_scale
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, keys) * scale
    visible = pos[None, :] < seq_lens.long()[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty request gives zeros
    out = torch.einsum("bkgs,bskd->bkgd", probs, values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, never splits shorter than MIN_TOKENS_PER_SPLIT.
    (A CUDA graph fixes it once per batch size, from max_model_len.)"""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    want = math.ceil(2 * sms / max(1, batch * num_kv_heads))
    return max(1, min(want, MAX_SPLITS, math.ceil(max_seq_len / MIN_TOKENS_PER_SPLIT)))


def _check_args(q, kv_cache, block_tables, seq_lens, out) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, 5, cache_dtypes(q.dtype))
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    check(
        kv_cache.shape[0] == 2 and kv_cache.shape[4] == head_dim and kv_cache.stride(3) == head_dim,
        f"kv_cache must be [2, num_blocks, block_size, Hkv, {head_dim}] with contiguous heads, "
        f"got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}",
    )
    check(num_heads % num_kv_heads == 0, f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    check(block_tables.shape[0] == batch, f"block_tables must have {batch} rows, got {tuple(block_tables.shape)}")
    check_shape("seq_lens", seq_lens, (batch,))
    if out is not None:
        check_tensor("out", out, 3, (q.dtype,))
        check_shape("out", out, tuple(q.shape))
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens)


def paged_attention_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    balance_splits: bool = False,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attend q [B, H, D] (one token per request) over its cached context; returns [B, H, D].

    kv_cache [2, num_blocks, block_size, Hkv, D] (same dtype as q), block_tables [B, max_blocks]
    int32, seq_lens [B] int32 (context length including this token, whose K/V is already
    cached). max_seq_len avoids a device sync when the caller knows it; num_splits overrides the
    split-K heuristic (1 = no split). balance_splits (with num_splits) keeps exactly num_splits
    programs per request and KV head and spreads each request's own context over them. An fp8
    kv_cache (k / k_scale, v / v_scale) is read back times its scales.
    """
    _check_args(q, kv_cache, block_tables, seq_lens, out)
    k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    check(
        -(-max_seq_len // block_size) <= block_tables.shape[1],
        f"block_tables width {block_tables.shape[1]} cannot hold {max_seq_len} tokens of block size {block_size}",
    )
    d_pad, group = next_pow2(head_dim), num_heads // num_kv_heads
    tiles = tile_sizes(q.dtype, d_pad, decode=True)
    tile_n = tiles.cols
    splits = num_splits or default_num_splits(batch, num_kv_heads, max_seq_len, q.device)
    per_split = triton.cdiv(triton.cdiv(max(max_seq_len, 1), splits), tile_n) * tile_n
    if not balance_splits:  # else the grid keeps every split: per_split is set per request
        splits = max(1, triton.cdiv(max_seq_len, per_split))
    part_out = part_lse = out  # placeholders, unused without a split
    if splits > 1:
        part_out = torch.empty(batch, num_heads, splits, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2E * k_scale, v_scale, per_split, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        head_dim, group,
        BLOCK_SIZE=block_size, G_PAD=max(16, next_pow2(group)), D_PAD=d_pad, TILE_N=tile_n,
        SPLIT=splits > 1, IEEE=q.dtype == torch.float32, BALANCE=balance_splits and splits > 1,
        num_warps=tiles.num_warps,
    )
    if splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, splits, out.stride(0), out.stride(1), head_dim,
            S_PAD=next_pow2(splits), D_PAD=d_pad,
        )
    return out
