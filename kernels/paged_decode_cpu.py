"""Paged decode attention on the CPU (float32 queries over a float32, bfloat16 or fp8 cache), a small C kernel
beside its torch reference.

The torch backend's decode path copies every request's K/V blocks out of the paged cache
(index_select) before SDPA reads them again: three passes over the largest tensor of a decode
step. paged_decode_cpu.c reads the blocks in place, once, each KV head for all the query heads that
share it. It is compiled on first use with the system C compiler into ~/.cache/pagedserve/kernels
(keyed by the source and this CPU's flags, since it is built for this CPU); without a compiler the
backend keeps its torch path. Threads: the kernel splits the requests and KV heads over
cpu_build.threads() threads itself (kernels/cpu_pool.h), in one ctypes call.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")


@cache
def _library() -> ctypes.CDLL | None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    argtypes = [ptr] * 7 + [i64] * 6 + [f32, i64, f32, f32, i64]
    return cpu_build.load_function(SOURCE, "CPU paged decode kernel", "paged_decode", argtypes)


def available() -> bool:
    return _library() is not None


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FORMATS = {torch.float32: 0, torch.float8_e4m3fn: 1, torch.float8_e5m2: 2, torch.bfloat16: 3}  # the kernel's `fmt` codes


def paged_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0, table_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D] float32 query rows against kv_cache [2, num_blocks, block_size, Hkv, D]: row t
    attends to the first seq_lens[t] tokens (int64) of table row table_rows[t] (int64; t without
    table_rows) of table [B, W] (int64 block ids) -> [T, H, D]. A prompt's tokens are rows of their
    own, each seeing the context up to itself. An fp8 cache holds k / k_scale and v / v_scale; a
    float32 or bfloat16 one ignores the scales."""
    lib = _library()
    batch, heads, dim = q.shape
    _, _, block, kv_heads, _ = kv_cache.shape
    fp8 = kv_cache.dtype in FP8_DTYPES
    assert lib is not None and q.dtype == torch.float32 and q.device.type == "cpu"
    assert kv_cache.dtype in FORMATS
    assert kv_cache.shape[-1] == dim and heads % kv_heads == 0 and kv_cache.is_contiguous()
    assert table.dtype == seq_lens.dtype == torch.int64 and seq_lens.shape[0] == batch
    assert int(seq_lens.max()) <= table.shape[1] * block
    if table_rows is None:
        assert table.shape[0] == batch
    else:
        assert table_rows.dtype == torch.int64 and table_rows.shape[0] == batch
        assert 0 <= int(table_rows.min()) and int(table_rows.max()) < table.shape[0]
        table_rows = table_rows.contiguous()
    q, table, seq_lens = q.contiguous(), table.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    k_scale, v_scale = (k_scale, v_scale) if fp8 else (1.0, 1.0)
    lib.paged_decode(q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), table.data_ptr(),
                     None if table_rows is None else table_rows.data_ptr(), seq_lens.data_ptr(), out.data_ptr(), batch, table.shape[1], heads, kv_heads, dim, block,
                     scale, FORMATS[kv_cache.dtype], k_scale, v_scale, cpu_build.threads())
    return out
