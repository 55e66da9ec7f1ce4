"""The inner step shared by the paged attention kernels: one tile of context through the block table.

A tile is TILE_N consecutive context positions of one request and one KV head. Positions map to
cache rows through the request's block table, so a tile may span several cache blocks and the
tile size does not depend on the block size. Scores are kept in the log2 domain (the softmax
scale is pre-multiplied by log2(e)) so the online softmax uses exp2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels._checks import FP8_DTYPES, check


def cache_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """What a KV cache read by dtype queries may hold: the same dtype, or fp8 with scales."""
    return (dtype, *FP8_DTYPES)


def kv_scales(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales that apply to a cache: an fp8 cache's, checked positive; (1, 1) for others."""
    if kv_cache.dtype not in FP8_DTYPES:
        return 1.0, 1.0
    check(k_scale > 0 and v_scale > 0, f"k_scale and v_scale must be positive, got {k_scale}, {v_scale}")
    return float(k_scale), float(v_scale)


class Tiles(NamedTuple):
    rows: int  # query rows per program (prefill; decode's rows are one token's query heads)
    cols: int  # context positions per step (TILE_N)
    num_warps: int


def tile_sizes(dtype: torch.dtype, d_pad: int, *, decode: bool = False) -> Tiles:
    """Tile shape for head size d_pad. 16-bit inputs run tl.dot on tensor cores; float32 runs it
    as exact FMA products with both operands in registers, which needs smaller tiles. Chosen so
    no variant spills to local memory on sm_80 or sm_90 (tests/kernels/native_compile.py checks)."""
    if dtype == torch.float32:
        return Tiles(32, 16, 4) if d_pad <= 128 else Tiles(16, 16, 4)
    if decode or d_pad <= 64:
        return Tiles(64, 64 if d_pad <= 128 else 32, 4)
    return Tiles(64, 64 if d_pad <= 128 else 32, 8)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs: exact fp32 products (Triton would default to tf32 on tensor cores).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def attend_tile(
    acc, m_i, l_i, q,
    cache_ptr, table_ptr, tile_start, kv_end, last_pos, kv_head_off,
    stride_ckv, stride_cblk, stride_coff, qk_scale,
    dims, dmask,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step.

    q: [M, D_PAD] query rows; acc [M, D_PAD], m_i [M], l_i [M] the running output, max and sum.
    Row r may see context positions <= last_pos[r] and < kv_end. table_ptr points at this
    request's block-table row; kv_head_off = kv_head * stride of the head dim in the cache.
    BLOCK_SIZE is a compile-time constant so the position -> (block, offset) split is shifts.
    """
    pos = tile_start + tl.arange(0, TILE_N)
    pmask = pos < kv_end
    blk = tl.load(table_ptr + pos // BLOCK_SIZE, mask=pmask, other=0).to(tl.int64)
    off = blk * stride_cblk + (pos % BLOCK_SIZE) * stride_coff + kv_head_off
    kv_mask = pmask[:, None] & dmask[None, :]
    # an fp8 cache is widened to the queries' dtype; its scales are folded into qk_scale and the output
    k = tl.load(cache_ptr + off[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    visible = (pos[None, :] <= last_pos[:, None]) & pmask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(cache_ptr + stride_ckv + off[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i
