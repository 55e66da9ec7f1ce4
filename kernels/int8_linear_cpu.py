"""Weight-only int8 linear on the CPU for small batches (decode), a C kernel beside its torch reference.

`linear` is what Int8Weights (services/worker/quant/int8.py) calls on the CPU: the kernel
(int8_linear_cpu.c) for float32 inputs of at most MAX_ROWS rows, else F.linear over the weight
dequantized by the same library (`dequantize`: one pass on the kernels' threads, where torch's
int8 -> float32 conversion then scaling took ~30x longer on a 3072 x 576 weight, ad hoc on a busy
machine). Over smol135's weight shapes streamed from memory, on a 2-core AMD EPYC shared with
other work (load ~9, so noisy): `benchmarks/linear_cpu.py --int8 --rows 1 2 4 8 16 --rounds 7`
measured the kernel 1.3-2.3x faster than the float32 kernel at 1 to 16 rows, and with
OMP_NUM_THREADS=1 `--rows 16 32 64 128 --rounds 3` 2.2x, 2.3x, 1.2x and 0.94x as fast as the
dequantized F.linear per call: past about 100 rows BLAS's blocking wins there. Whole steps still
gain up to 128 rows: on a quiet 2-core AMD EPYC with AVX512, 112 requests decoding together (smol135
int8, 48 tokens each, one `LLM.generate`) took 12.9 s with MAX_ROWS 128 (every decode step one C
call, kernels/decode_step_cpu.py) against 16.0 s with 64, twice each. Torch's
_weight_int8pack_mm measured 10-40x slower than float32. Like the float32 kernel it keeps its
threads in decode-sized steps (services/worker/step_threads.py).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build, f32_linear_cpu

SOURCE = Path(__file__).with_name("int8_linear_cpu.c")
MAX_ROWS = f32_linear_cpu.MAX_ROWS  # a decode step's limit, as the float32 kernel's


@cache
def _library() -> ctypes.CDLL | None:
    argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    lib = cpu_build.load_function(SOURCE, "CPU int8 linear kernel", "int8_linear", argtypes)
    if lib is not None:
        lib.int8_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        lib.int8_dequantize.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this call: float32 on the CPU, few rows, whole vectors of K."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.shape[1] % 8 == 0 and x.numel() // weight.shape[1] <= MAX_ROWS and available())


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Torch reference: dequantize the weight (int8 [N, K] times scale [N]) and run F.linear."""
    return torch.nn.functional.linear(x, _dequantize_ref(weight, scale).to(x.dtype), bias)


def _dequantize_ref(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.to(scale.dtype) * scale[:, None]


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight [N, K] times scale [N] in float32, as the reference computes it (the same
    product per element), in one pass through the kernel's library where it can."""
    n, k = weight.shape
    if not (weight.device.type == "cpu" and weight.dtype == torch.int8 and scale.dtype == torch.float32
            and k % 8 == 0 and available()):
        return _dequantize_ref(weight, scale)
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty(n, k, dtype=torch.float32)
    _library().int8_dequantize(weight.data_ptr(), scale.data_ptr(), out.data_ptr(), n, k, max(1, min(cpu_build.threads(), n)))
    return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 times int8 weight [N, K] with per-row float32 scale [N] (+ bias [N]); see usable()."""
    lib = _library()
    assert lib is not None and x.dtype == scale.dtype == torch.float32 and weight.dtype == torch.int8
    n, k = weight.shape
    assert k % 8 == 0 and scale.shape == (n,) and (bias is None or bias.shape == (n,))
    weight, scale = weight.contiguous(), scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.data_ptr()
    lib.int8_linear(rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), bias_ptr, out.data_ptr(),
                    rows.shape[0], k, n, max(1, min(cpu_build.threads(), n // 4)))
    return out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 matmul on the CPU: through the C kernel where it is faster, else the float32 path
    (f32_linear_cpu.linear: oneDNN's matmul at prefill sizes) over the dequantized weight."""
    if usable(x, weight):
        return int8_linear(x, weight, scale, bias)
    return f32_linear_cpu.linear(x, dequantize(weight, scale).to(x.dtype), bias)
