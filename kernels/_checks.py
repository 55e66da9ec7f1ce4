"""Argument checks shared by the kernel wrappers.

Triton kernels take raw pointers and strides, so a wrong shape, dtype or layout corrupts memory
instead of failing. Every wrapper validates its arguments with these helpers first and raises
ValueError with a message naming the argument.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # KV cache storage (kv_cache_dtype fp8*)


def fp8_limit(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 cache dtype (what a write saturates at); 0 for others."""
    return float(torch.finfo(dtype).max) if dtype in FP8_DTYPES else 0.0


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    *,
    last_contiguous: bool = True,
) -> None:
    """Check rank and dtype; with last_contiguous, the innermost dimension must have stride 1."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if last_contiguous and t.numel() > 0:
        check(t.stride(-1) == 1, f"{name} must have a contiguous last dim, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, CUDA unless the interpreter runs the kernels."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    check(
        all(d == first for d in devices.values()),
        f"all tensors must be on one device, got {', '.join(f'{n}={d}' for n, d in devices.items())}",
    )
    check(
        first.type == "cuda" or interpreting(),
        f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device {first}",
    )
    return first


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
