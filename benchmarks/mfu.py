"""Model FLOPs utilization: parameters counted from a checkpoint, over this machine's measured GEMM peak."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in the checkpoint, a tied output embedding counted once."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(file))
    if not shapes:
        raise ValueError(f"{model_dir} has no safetensors weights to count")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("tie_word_embeddings", False):
        # Some checkpoints store the tied copy too; it is one parameter.
        shapes.pop("lm_head.weight", None)
    return sum(math.prod(shape) for shape in shapes.values())


def mfu(params: int, tokens: int, elapsed_s: float, peak_gflops: float) -> float:
    """Model FLOPs utilization: 2 FLOPs per parameter per token processed, over the GEMM peak."""
    if elapsed_s <= 0 or peak_gflops <= 0:
        return 0.0
    return 2.0 * params * tokens / elapsed_s / (peak_gflops * 1e9)


def measure_gemm_peak(size: int, reps: int, warmup: int = 2, device: str = "cpu", dtype: str = "float32") -> float:
    """Best GFLOP/s of a square matmul on this machine: float32 on the CPU, the run's dtype on CUDA.
    On the CPU the best of torch.mm (MKL) and oneDNN's matmul, the one the engine runs for prefill
    (kernels/f32_linear_cpu.py), so that MFU is against the fastest GEMM the machine offers."""
    import torch

    from kernels import f32_linear_cpu

    gen = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    a = torch.randn(size, size, generator=gen).to(device, kind)
    b = torch.randn(size, size, generator=gen).to(device, kind)
    out = torch.empty(size, size, device=device, dtype=kind)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kernels = [lambda: torch.mm(a, b, out=out)]
    if device == "cpu" and dtype == "float32" and f32_linear_cpu._onednn():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(warmup):
            kernel()
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            kernel()
            sync()
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9
