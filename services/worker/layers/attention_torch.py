"""Vectorized torch attention over the paged KV cache (the CPU backend).

All index tensors and masks are built once per step in build() (on the host, then copied to the
device, from pinned memory on CUDA). On CPU with float32 or bfloat16 queries, a layer's forward is a cache
write and one call of the C kernel (kernels/paged_decode_cpu.py) over every query token of the
step, each attending to its context up to itself (chunks of long contexts excepted, see
_KERNEL_MAX_CHUNK_CONTEXT). Elsewhere it is a cache write, one block-granular gather and one
scaled_dot_product_attention call per group (decodes, prefill chunks): no Python loop over
requests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import paged_decode_cpu
from services.worker.layers.attention_backend import CommonAttentionMetadata
from services.worker.quant.kv_fp8 import dequantize, is_fp8, quantize, read_cache, write_cache
from services.worker.transfer import to_device


@dataclass
class _Group:
    token_slice: slice  # this group's tokens in the flattened batch
    block_table: torch.Tensor  # [B, W] block ids (padded with block 0, masked out)
    mask: torch.Tensor | None  # [B, 1, Q, W * block_size] additive; None = plain causal, no context
    query_index: torch.Tensor | None  # [T_group] row in the padded [B * Q] query layout
    max_q: int
    seq_lens: torch.Tensor | None = None  # [T] int64: each query row's context, where the CPU kernel runs
    table_rows: torch.Tensor | None = None  # [T] int64: each query row's request (None: one row each)


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor
    groups: list[_Group]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _build_group(common: CommonAttentionMetadata, lo: int, hi: int, dtype: torch.dtype, kernel: bool) -> _Group:
    qsl, device = common.query_start_loc, common.device
    seq_lens = common.seq_lens[lo:hi]
    q_lens = [qsl[i + 1] - qsl[i] for i in range(lo, hi)]
    width = -(-max(seq_lens) // common.block_size)
    table = torch.from_numpy(common.block_table[lo:hi, :width]).long()
    token_slice = slice(qsl[lo], qsl[hi])
    max_q, max_s = max(q_lens), table.shape[1] * common.block_size
    seq = torch.tensor(seq_lens)
    q_len = torch.tensor(q_lens)
    key_pos = torch.arange(max_s)
    if kernel:  # reads the cache in place, one row per query token, each seeing the context up to itself
        rows = None
        if max_q > 1:
            rows = torch.repeat_interleave(torch.arange(hi - lo), q_len)
            first = torch.repeat_interleave(torch.cumsum(q_len, 0) - q_len, q_len)  # each row's chunk start
            seq = torch.repeat_interleave(seq - q_len, q_len) + (torch.arange(len(rows)) - first) + 1
        return _Group(token_slice, table.contiguous(), None, None, max_q, seq, rows)
    if max_q == 1:  # decodes: each query sees its whole context
        allowed = (key_pos[None, :] < seq[:, None])[:, None, None, :]
        return _Group(token_slice, to_device(table, device), to_device(_additive(allowed, dtype), device), None, 1)
    if hi - lo == 1 and seq_lens[0] == q_lens[0]:  # one fresh prompt: plain causal attention
        return _Group(token_slice, to_device(table, device), None, None, max_q)
    # Query i of request b sits at position ctx_b + i and sees keys at positions <= ctx_b + i.
    ctx = seq - q_len
    q_pos = ctx[:, None] + torch.arange(max_q)[None, :]  # [B, Q]
    valid_q = torch.arange(max_q)[None, :] < q_len[:, None]
    allowed = key_pos[None, None, :] <= q_pos[:, :, None]
    allowed &= valid_q[:, :, None]
    allowed[:, :, 0] |= ~valid_q  # padded query rows attend one key so softmax stays finite
    rows = torch.arange(hi - lo)[:, None] * max_q + torch.arange(max_q)[None, :]
    query_index = rows[valid_q]
    mask = _additive(allowed[:, None], dtype)
    return _Group(token_slice, to_device(table, device), to_device(mask, device), to_device(query_index, device), max_q)


def _decode_kernel(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """The C decode kernel: float32 or bfloat16 queries (widened to float32) over a cache of the
    model's dtype or fp8."""
    cache_ok = kv_dtype == dtype or kv_dtype in paged_decode_cpu.FP8_DTYPES
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cache_ok
            and paged_decode_cpu.available())


_MAX_PADDING = 0.25  # share of padding a group may carry
# The C kernel takes every query token as a row of its own, reading its request's context once per
# tile of 16 tokens and keeping each row's scores whole: right for decodes, speculative
# verification and chunks of short contexts (1.4x SDPA's masked batch on eight 256-token prompts,
# quiet; 4x on prompts of mixed lengths, loaded). A chunk's scores outgrow the caches on long
# contexts, where SDPA over the gathered context is faster (2.4x at a 2048-token chunk after 8192
# tokens): chunks past this context take SDPA.
_KERNEL_MAX_QUERY = 16
_KERNEL_MAX_CHUNK_CONTEXT = 2048


def _similar_runs(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """Split requests lo..hi (sorted longest first, as the runner orders them) into runs of
    similar size, so padding each run to its longest member wastes little attention work."""
    ranges = []
    while lo < hi:
        end, total = lo, 0
        while end < hi and sizes[lo] * (end - lo + 1) <= (total + sizes[end]) * (1 + _MAX_PADDING):
            total, end = total + sizes[end], end + 1
        ranges.append((lo, end))
        lo = end
    return ranges


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the cache's: the model's, or fp8

    def build(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        qsl, nd, n = common.query_start_loc, common.num_decodes, common.num_reqs
        q_lens = [qsl[i + 1] - qsl[i] for i in range(n)]
        # decodes grouped by context length (what SDPA reads padded), prefill chunks by query length
        kernel = _decode_kernel(common.device, self.dtype, self.kv_dtype)
        short = all(q <= _KERNEL_MAX_QUERY or s <= _KERNEL_MAX_CHUNK_CONTEXT for q, s in zip(q_lens, common.seq_lens))
        if kernel and n and short:  # one kernel call for the whole batch
            return TorchAttentionMetadata(common.slot_mapping, [_build_group(common, 0, n, self.dtype, True)])
        # the C kernel reads each request's own length in place: padding costs it nothing
        decodes = [(0, nd)] if kernel and nd else _similar_runs(common.seq_lens, 0, nd)
        ranges = decodes + _similar_runs(q_lens, nd, n)
        groups = [_build_group(common, lo, hi, self.dtype, kernel and hi <= nd) for lo, hi in ranges]
        return TorchAttentionMetadata(common.slot_mapping, groups)

    def forward(
        self, q, k, v, kv_cache, meta: TorchAttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0
    ) -> torch.Tensor:
        """k_scale / v_scale: an fp8 cache's per-layer scales (see services/worker/quant/kv_fp8.py)."""
        write_cache(kv_cache[0], meta.slot_mapping, k, k_scale)
        write_cache(kv_cache[1], meta.slot_mapping, v, v_scale)
        scales = (k_scale, v_scale)
        if len(meta.groups) == 1:
            return _attend(q, k, v, kv_cache, meta.groups[0], scale, scales)
        out = torch.empty_like(q)
        for g in meta.groups:
            out[g.token_slice] = _attend(q[g.token_slice], k, v, kv_cache, g, scale, scales)
        return out


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, W * block_size, D] from whole blocks: contiguous block copies, not per-token indexing."""
    batch, width = table.shape
    blocks = cache.index_select(0, table.flatten())  # [B * W, bs, Hkv, D]
    return blocks.view(batch, width * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _attend(q, k_new, v_new, kv_cache, g: _Group, scale: float, kv_scales: tuple[float, float]) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    if g.seq_lens is not None:
        out = paged_decode_cpu.paged_decode(q.float(), kv_cache, g.block_table, g.seq_lens, scale, *kv_scales,
                                            g.table_rows)
        return out.to(q.dtype)
    if g.mask is None:  # a single fresh prompt: its keys are exactly this step's k/v
        k, v = k_new[g.token_slice], v_new[g.token_slice]
        if is_fp8(kv_cache.dtype):  # as the cache holds them, so batching never changes a result
            k, v = (dequantize(quantize(t, s, kv_cache.dtype), s, q.dtype) for t, s in zip((k, v), kv_scales))
        # 4-D [1, H, T, D]: with a batch dimension CPU SDPA takes its fused (flash) kernel
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
    batch = g.block_table.shape[0]
    keys = read_cache(_gather(kv_cache[0], g.block_table), kv_scales[0], q.dtype)
    values = read_cache(_gather(kv_cache[1], g.block_table), kv_scales[1], q.dtype)
    if g.query_index is None:
        queries = q.view(batch, 1, num_heads, head_dim)
    else:
        queries = q.new_zeros(batch * g.max_q, num_heads, head_dim)
        queries[g.query_index] = q
        queries = queries.view(batch, g.max_q, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=g.mask, scale=scale, enable_gqa=True
    ).transpose(1, 2)  # [B, Q, H, D]
    if g.query_index is None:
        return out.reshape(batch, num_heads, head_dim)
    return out.reshape(batch * g.max_q, num_heads, head_dim)[g.query_index]
