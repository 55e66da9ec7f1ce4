"""Activation functions over flattened tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import rows_cpu
from services.worker.forward_context import use_triton_kernels


class SiluAndMul(nn.Module):
    """Gated SiLU of a merged gate/up projection: [T, 2I] -> silu(gate) * up, [T, I] (one
    kernel with the Triton backend, one C op for float32 or bfloat16 on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels():
            from kernels.activation import silu_and_mul

            return silu_and_mul(x)
        if rows_cpu.usable(x):
            return rows_cpu.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """Gated GELU (GeGLU) of a merged gate/up projection: [T, 2I] -> gelu(gate) * up, [T, I]."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


GATED_ACTIVATIONS = {
    "silu": SiluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu": GeluAndMul,
}


def get_gated_act_fn(name: str) -> nn.Module:
    """The gated activation for an HF config's hidden_act (Llama-style gate/up MLPs)."""
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[name]()


def get_act_fn(name: str) -> nn.Module:
    """The activation an HF config names (OPT's activation_function)."""
    if name != "relu":
        raise ValueError(f"unsupported activation function {name!r}; supported: relu")
    return nn.ReLU()
