"""RMSNorm (with the residual add), rotary and SiLU-and-mul for float32 or bfloat16 CPU tensors,
through the C ops of rows_cpu.c, threaded over rows (bfloat16 computed in float32 and rounded as
the layers' torch ops round).

The layers (services/worker/layers/) call them for float32 and bfloat16 CPU inputs, where torch
ran each as a chain of broadcasting ops (on a 2048-token prefill step of smol135, 2.0x faster here
on a quiet machine and 9x on a loaded one: see rows_cpu.c). The same C code runs between the
projections of the one-call decode step (decode_step_cpu.c). Without a C compiler the layers keep
their torch code.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_name("rows_cpu.c")


@cache
def _library() -> ctypes.CDLL | None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib = cpu_build.load_function(SOURCE, "CPU row ops", "rms_norm", [ptr] * 5 + [i64, i64, f32, i64, i64])
    if lib is not None:
        lib.rotary.argtypes, lib.rotary.restype = [ptr, i64, i64, i64, ptr, ptr, i64, i64, i64], None
        lib.silu_and_mul.argtypes, lib.silu_and_mul.restype = [ptr, ptr, i64, i64, i64, i64], None
    return lib


FORMATS = {torch.float32: 0, torch.bfloat16: 3}  # rows_cpu.c's fmt codes (widen.h's F32, BF16)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C ops take these tensors: all float32 or all bfloat16, on the CPU, outside
    autograd."""
    return (tensors[0].dtype in FORMATS and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)
            and not torch.is_grad_enabled() and _library() is not None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, times weight; with residual, of x + residual, returning
    (normed, x + residual) as RMSNorm's forward does. New tensors; the inputs are left alone."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    out = torch.empty_like(rows)
    res_in = None if residual is None else residual.reshape(rows.shape).contiguous()
    res_out = None if residual is None else torch.empty_like(rows)
    _library().rms_norm(rows.data_ptr(), _ptr(res_in), _ptr(res_out), weight.contiguous().data_ptr(), out.data_ptr(),
                        rows.shape[0], hidden, eps, FORMATS[x.dtype], cpu_build.threads())
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def rotary(positions: torch.Tensor, x: torch.Tensor, head_dim: int, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads * head_dim] (float32 or bfloat16; rows may be strided: a view of a fused
    projection) rotated in place at positions [T] by cos_sin [max_position, head_dim] (float32:
    cosines, then sines); returns x. ValueError for a position outside the table."""
    if x.stride(-1) != 1 or x.dim() != 2:
        raise ValueError("rotary takes [T, heads * head_dim] with contiguous rows")
    if x.dtype not in FORMATS or cos_sin.dtype != torch.float32:
        raise ValueError("rotary takes float32 or bfloat16 rows and a float32 table")
    positions = positions.to(torch.int64).contiguous()
    if positions.numel() != x.shape[0]:
        raise ValueError(f"{positions.numel()} positions for {x.shape[0]} tokens")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin.shape[0]):
        raise ValueError(f"positions outside [0, {cos_sin.shape[0]})")
    _library().rotary(x.data_ptr(), x.stride(0), x.shape[1] // head_dim, head_dim, positions.data_ptr(),
                      cos_sin.contiguous().data_ptr(), x.shape[0], FORMATS[x.dtype], cpu_build.threads())
    return x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate, then up) -> silu(gate) * up, [..., I]."""
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * inter).contiguous()
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype)
    _library().silu_and_mul(rows.data_ptr(), out.data_ptr(), rows.shape[0], inter, FORMATS[x.dtype], cpu_build.threads())
    return out.view(*x.shape[:-1], inter)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
