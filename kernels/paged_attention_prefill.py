"""Prefill and chunked-prefill attention over the paged KV cache.

Queries of several requests are flattened ([T, H, D], request b owns rows
query_start_loc[b]:query_start_loc[b+1]); their K/V are already in the cache. Query i of request
b sits at position seq_len - q_len + i and sees every cached position up to its own, so a chunk
after a cached prefix reads the prefix through the block table like any other context.

One program handles BLOCK_Q queries of one request and one KV head with all query heads of its
group packed into the rows of one tile (row = query * G_PAD + head in group), so each K/V tile is
loaded once per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor, next_pow2
from kernels._paged_tile import attend_tile, cache_dtypes, kv_scales, tile_sizes

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, table_ptr, seq_lens_ptr, qsl_ptr, out_ptr, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ckv, stride_cblk, stride_coff, stride_ch, stride_bt,
    head_dim, group_size,
    BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, TILE_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + rows // G_PAD
    g = rows % G_PAD
    row_mask = (qi < q_len) & (g < group_size)
    dims = tl.arange(0, D_PAD)
    dmask = dims < head_dim
    token = (q_start + qi).to(tl.int64)
    head = kvh * group_size + g
    io_mask = row_mask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    last_pos = ctx_len + qi
    # the last query of this tile bounds the context any row may see
    kv_end = tl.minimum(seq_len, ctx_len + (q_tile + 1) * BLOCK_Q)
    table = table_ptr + b.to(tl.int64) * stride_bt
    for tile_start in range(0, kv_end, TILE_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, cache_ptr, table, tile_start, kv_end, last_pos, kvh * stride_ch,
            stride_ckv, stride_cblk, stride_coff, qk_scale, dims, dmask, BLOCK_SIZE, TILE_N, IEEE,
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    dst = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_attention_prefill_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Torch reference, one request at a time in float32: gather the context through the block
    table (an fp8 cache times its scales), apply the causal mask at the queries' absolute
    positions, softmax, weight values."""
    k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    keys_flat = kv_cache[0].reshape(-1, num_kv_heads, head_dim)
    values_flat = kv_cache[1].reshape(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = qsl[b], qsl[b + 1]
        if hi == lo:
            continue
        pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        keys = (keys_flat[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [S, H, D]
        values = (values_flat[slots].float() * v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), keys) * scale
        q_pos = seq_len - (hi - lo) + torch.arange(hi - lo, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out


def _check_args(q, kv_cache, block_tables, seq_lens, query_start_loc, out) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, 5, cache_dtypes(q.dtype))
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,))
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    check(
        kv_cache.shape[0] == 2 and kv_cache.shape[4] == head_dim and kv_cache.stride(3) == head_dim,
        f"kv_cache must be [2, num_blocks, block_size, Hkv, {head_dim}] with contiguous heads, "
        f"got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}",
    )
    check(num_heads % num_kv_heads == 0, f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    batch = seq_lens.shape[0]
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    check(block_tables.shape[0] == batch, f"block_tables must have {batch} rows, got {tuple(block_tables.shape)}")
    if out is not None:
        check_tensor("out", out, 3, (q.dtype,))
        check_shape("out", out, tuple(q.shape))
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens, qsl=query_start_loc)


def paged_attention_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of flattened queries q [T, H, D] over their requests' paged context.

    query_start_loc [B+1] int32 (starting at 0), seq_lens [B] int32 (cached prefix + new tokens,
    whose K/V are already written), block_tables [B, max_blocks] int32. Returns [T, H, D].
    max_query_len avoids a device sync when the caller knows it. An fp8 kv_cache (k / k_scale,
    v / v_scale) is read back times its scales.
    """
    _check_args(q, kv_cache, block_tables, seq_lens, query_start_loc, out)
    k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q) if out is None else out
    batch = seq_lens.shape[0]
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    group = num_heads // num_kv_heads
    g_pad, d_pad = next_pow2(group), next_pow2(head_dim)
    tiles = tile_sizes(q.dtype, d_pad)
    block_m = max(tiles.rows, g_pad)  # rows: BLOCK_M // G_PAD queries x G_PAD heads
    grid = (batch, triton.cdiv(max_query_len, block_m // g_pad), num_kv_heads)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        head_dim, group,
        BLOCK_SIZE=block_size, G_PAD=g_pad, BLOCK_Q=block_m // g_pad, BLOCK_M=block_m, D_PAD=d_pad, TILE_N=tiles.cols,
        IEEE=q.dtype == torch.float32, num_warps=tiles.num_warps,
    )
    return out
