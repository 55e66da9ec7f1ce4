"""SiLU-and-multiply, the gated MLP activation: x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_tensor

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference in float32, rounded once to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I]; returns [T, I] (into out when given)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    num_tokens, width = x.shape
    check(width % 2 == 0, f"x width must be even (gate and up halves), got {width}")
    inter = width // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    check_tensor("out", out, 2, (x.dtype,))
    check(tuple(out.shape) == (num_tokens, inter), f"out must have shape {(num_tokens, inter)}, got {tuple(out.shape)}")
    check_same_device(x=x, out=out)
    if num_tokens:
        block = min(BLOCK, 1 << max(4, (inter - 1).bit_length()))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=block
        )
    return out
