"""Activation functions over flattened tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.forward_context import use_triton_kernels


class SiluAndMul(nn.Module):
    """Gated SiLU of a merged gate/up projection: [T, 2I] -> silu(gate) * up, [T, I] (one
    kernel with the Triton backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels():
            from kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_fn(name: str) -> nn.Module:
    """The activation an HF config names (OPT's activation_function)."""
    if name != "relu":
        raise ValueError(f"unsupported activation function {name!r}; supported: relu")
    return nn.ReLU()
