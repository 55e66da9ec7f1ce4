"""The fp8 KV cache write on the CPU (quantize on write), a C kernel beside its torch reference.

write_cache in services/worker/quant/kv_fp8.py calls `write` for float32 keys or values into an fp8
cache on the CPU: one ctypes call per layer and half, where its torch path runs four ops (timed
ad hoc on a busy machine: about 4x a float32 cache's index_copy_ per call, against about 1.6x for
the kernel; a smol135 decode step makes 60 such calls). The bytes are the torch path's exactly (tests/test_kv_cache_fp8.py). Without a C compiler the torch
path runs.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build, paged_decode_cpu

SOURCE = Path(__file__).with_name("kv_write_cpu.c")
FORMATS = {dtype: paged_decode_cpu.FORMATS[dtype] for dtype in paged_decode_cpu.FP8_DTYPES}  # the fp8 `fmt` codes


@cache
def _library() -> ctypes.CDLL | None:
    i64 = ctypes.c_int64
    lib = cpu_build.load_function(SOURCE, "CPU fp8 KV write kernel", "kv_write_fp8",
                                  [ctypes.c_void_p] * 3 + [i64] * 3 + [ctypes.c_float, i64])
    if lib is not None:
        lib.kv_write_fp8.restype = i64  # slots out of range
    return lib


def usable(cache_: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel takes this write: float32 into an fp8 cache, both contiguous on the CPU."""
    return (cache_.device.type == "cpu" and cache_.dtype in FORMATS and x.dtype == torch.float32
            and cache_.is_contiguous() and _library() is not None)


def write(cache_: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """Store fp8(clamp(x / scale)) for x [T, Hkv, D] at slots [T] of cache [num_blocks, block_size, Hkv, D]."""
    tokens, row = x.shape[0], x.shape[1] * x.shape[2]
    assert cache_.shape[2] * cache_.shape[3] == row and slots.shape == (tokens,)
    x, slots = x.contiguous(), slots.to(torch.int64).contiguous()
    rows = cache_.shape[0] * cache_.shape[1]
    bad = _library().kv_write_fp8(x.data_ptr(), slots.data_ptr(), cache_.data_ptr(), tokens, row, rows, scale,
                                  FORMATS[cache_.dtype])
    if bad:
        raise IndexError(f"{bad} KV cache slots out of range [0, {rows})")
