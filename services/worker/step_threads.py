"""torch's thread count per step on the CPU.

A decode-sized float32 or bfloat16 step (at most f32_linear_cpu.MAX_ROWS tokens) runs its matmuls
(float32, bfloat16 or int8 weights: int8_linear_cpu.MAX_ROWS is no smaller) and its attention in
the C kernels (kernels/), which split their work over their own threads. What is left
to torch is hundreds of tiny ops per step (norms, rotary, residual adds, views, sampling), for
each of which waking and joining OpenMP threads costs more than the op itself, and whose spinning
threads take cycles from the kernels' threads and from the frontend and engine processes. So such
steps run torch on one thread, and larger steps (prefill, where BLAS does the matmuls) on all.
Sampling is the exception inside such a step: its ops run over rows of the whole vocabulary, big
enough that from two rows on all threads pay (smol135's 49,152 entries, temperature 1, 2 threads
on a 2-core AMD EPYC: 1.04 -> 0.57 ms at 8 rows, 5.4 -> 2.9 ms at 40; the same at one row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels import cpu_build, f32_linear_cpu

_all_threads: int | None = None  # torch's own count while for_step holds it at one thread


@contextmanager
def for_step(device: torch.device, dtype: torch.dtype, num_tokens: int) -> Iterator[None]:
    """torch's thread count for a step of num_tokens tokens (CPU, float32 or bfloat16), restored after
    it, so that the caller's own torch work (an offline user's) keeps its threads."""
    global _all_threads
    before = torch.get_num_threads()
    wanted = 1 if num_tokens <= f32_linear_cpu.MAX_ROWS else before
    if device.type != "cpu" or dtype not in f32_linear_cpu.DTYPES or wanted == before or not f32_linear_cpu.available():
        yield
        return
    cpu_build.set_threads(before)  # the kernels keep every thread
    torch.set_num_threads(wanted)
    _all_threads = before
    try:
        yield
    finally:
        _all_threads = None
        torch.set_num_threads(before)
        cpu_build.set_threads(None)


@contextmanager
def for_sampling(num_rows: int) -> Iterator[None]:
    """torch's every thread again for sampling num_rows rows within for_step (from two rows on)."""
    if _all_threads is None or num_rows < 2:
        yield
        return
    torch.set_num_threads(_all_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
