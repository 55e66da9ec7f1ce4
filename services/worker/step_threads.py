"""torch's thread count per step on the CPU.

A decode-sized float32 step (at most f32_linear_cpu.MAX_ROWS tokens) runs its matmuls and its
attention in the C kernels (kernels/), which split their work over their own threads. What is left
to torch is hundreds of tiny ops per step (norms, rotary, residual adds, views, sampling), for
each of which waking and joining OpenMP threads costs more than the op itself, and whose spinning
threads take cycles from the kernels' threads and from the frontend and engine processes. So such
steps run torch on one thread, and larger steps (prefill, where BLAS does the matmuls) on all.
"""

from __future__ import annotations

import torch

from kernels import cpu_build, f32_linear_cpu

_full: int | None = None  # torch's thread count before the first step: the kernels' from then on


def set_for_step(device: torch.device, dtype: torch.dtype, num_tokens: int) -> None:
    """Set torch's thread count for a step of num_tokens tokens (CPU, float32 only)."""
    global _full
    if device.type != "cpu" or dtype != torch.float32 or not f32_linear_cpu.available():
        return
    if _full is None:
        _full = torch.get_num_threads()
        cpu_build.set_threads(_full)
    wanted = 1 if num_tokens <= f32_linear_cpu.MAX_ROWS else _full
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
