"""Weight-only int8 linear on the CPU for small batches (decode), a C kernel beside its torch reference.

Measured at SmolLM2-135M's shapes over a whole model's weights (so they come from memory, as in
decode): the C kernel ran 1.3-1.6x faster than float32 F.linear at one row, while dequantizing per
matmul and torch's _weight_int8pack_mm were 10-40x slower (benchmarks/quant.py reports the model
figure). Larger batches are compute-bound: the caller dequantizes and runs F.linear instead.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("int8_linear_cpu.c")
MAX_ROWS = 16  # past this many rows of x the dequantize + F.linear path is faster


@cache
def _library() -> ctypes.CDLL | None:
    argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    return cpu_build.load_function(SOURCE, "CPU int8 linear kernel", "int8_linear", argtypes)


def available() -> bool:
    return _library() is not None


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Torch reference: dequantize the weight (int8 [N, K] times scale [N]) and run F.linear."""
    return torch.nn.functional.linear(x, (weight.to(scale.dtype) * scale[:, None]).to(x.dtype), bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 times int8 weight [N, K] with per-row float32 scale [N] (+ bias [N])."""
    lib = _library()
    assert lib is not None and x.dtype == scale.dtype == torch.float32 and weight.dtype == torch.int8
    assert weight.is_contiguous() and scale.is_contiguous() and (bias is None or bias.is_contiguous())
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.data_ptr()
    lib.int8_linear(rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), bias_ptr, out.data_ptr(),
                    rows.shape[0], k, n, max(1, min(cpu_build.threads(), n)))
    return out.view(*x.shape[:-1], n)
