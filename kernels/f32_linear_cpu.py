"""float32 or bfloat16 linear on the CPU for decode-sized batches, a C kernel beside torch's F.linear.

`linear` is what the model's linear layers and LM head call: it runs the kernel (f32_linear_cpu.c)
for float32 or bfloat16 CPU inputs of at most MAX_ROWS rows, oneDNN's matmul for more float32
rows, and F.linear otherwise.
The kernel takes dot products below PACK_ROWS rows and packed panels from there (36 rows built for
AVX512, 24 for AVX2: where the panels overtake, f32_linear_cpu.c). Measured over smol135's weight
shapes streamed from memory (benchmarks/linear_cpu.py, on a 2-core AMD EPYC where torch's sgemm is
MKL's, torch's OpenMP threads sleeping between ops as in the engine), it ran 1.6-3.2x F.linear and
1.1-2.2x oneDNN's matmul at 8 to 128 rows (before linear_cpu.py ran torch that way, the threads'
spinning after each torch op took the cores from the kernel timed next, and it showed 0.75-1.5x
oneDNN's); the one-call decode step built on them ran 1.5x the layers through oneDNN at 48 rows. oneDNN's blocking wins from a few hundred rows.
MAX_ROWS 128: on a quiet 2-core AMD EPYC with AVX512-BF16, 112 requests decoding together (smol135,
32-token prompts, 48 tokens each, one `LLM.generate`, twice each) took 11.7-12.4 s with it against
13.7-16.6 s with 64 in float32, and 6.9-7.0 s against 8.7-9.1 s in bfloat16 (whose weights take
torch's AVX512-BF16 matmuls past it: 1.5x this kernel's packed panels at 128 rows alone, but not
the whole step). int8_linear_cpu's MAX_ROWS is this one, so that a decode step of any of these
weights runs whole in the C kernels. It keeps its own threads when torch runs one
(services/worker/step_threads.py). Without a C compiler, F.linear runs everywhere.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu_build

SOURCE = Path(__file__).with_name("f32_linear_cpu.c")
MAX_ROWS = 128


@cache
def _library() -> ctypes.CDLL | None:
    argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    lib = cpu_build.load_function(SOURCE, "CPU float32 linear kernel", "f32_linear", argtypes)
    if lib is not None:
        lib.bf16_linear.argtypes, lib.bf16_linear.restype = argtypes, None
    return lib


def available() -> bool:
    return _library() is not None


DTYPES = (torch.float32, torch.bfloat16)  # the weights the kernel reads; the arithmetic is float32


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this call: float32 or bfloat16 x and weight of one dtype on the CPU,
    few rows, whole vectors of K."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and weight.dtype in DTYPES and weight.dim() == 2
            and weight.shape[1] % 8 == 0 and weight.is_contiguous() and x.numel() // weight.shape[1] <= MAX_ROWS
            and not torch.is_grad_enabled() and available())


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] (+ bias [N]) through the C kernel, in float32 (a bfloat16
    weight widened as it is read), returned in x's dtype; see usable()."""
    lib = _library()
    n, k = weight.shape
    rows = x.reshape(-1, k).float().contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    bias = None if bias is None else bias.float().contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    threads = max(1, min(cpu_build.threads(), n // 3))
    kernel = lib.bf16_linear if weight.dtype == torch.bfloat16 else lib.f32_linear
    kernel(rows.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), rows.shape[0], k, n, threads)
    return out.view(*x.shape[:-1], n).to(x.dtype)


@cache
def _onednn() -> bool:
    """Whether this torch has oneDNN's linear op (private: torch's CPU compiler backend calls it)
    and it computes a matmul right."""
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), torch.ones(3, 8), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(out, torch.full((2, 3), 8.0))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the fastest float32 CPU path: the C kernel for a few rows; oneDNN's
    matmul for more, which ran 1.0-1.9x MKL's sgemm (F.linear's) at prefill shapes on this AMD CPU
    (MKL takes a generic code path on non-Intel CPUs); F.linear elsewhere."""
    if usable(x, weight):
        return f32_linear(x, weight, bias)
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and not torch.is_grad_enabled() and _onednn()):
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
