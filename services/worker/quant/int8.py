"""Weight-only int8 (W8A16, per output channel), quantized at load: quantization="int8".

Each linear layer's float weight [N, K] becomes int8 q = round(W / s) with s = max|W[n]| / 127 per
output row, and the layer multiplies through Int8Weights: on CUDA the Triton GEMM
(kernels/int8_linear.py), on CPU the C kernel for small batches (kernels/int8_linear_cpu.py, what
decode runs), else the weight dequantized for that matmul. Embeddings and the LM head stay in the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import int8_linear_cpu


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row: (int8 [N, K], float32 scale [N]); an all-zero row gets scale 1."""
    amax = weight.float().abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(weight.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Weights:
    """A linear layer's int8 weight and per-row scales, and the matmul that uses them."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        self.weight, self.scale = weight.contiguous(), scale.contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            from kernels.int8_linear import int8_linear_triton

            return int8_linear_triton(x, self.weight, self.scale, bias)
        return int8_linear_cpu.linear(x, self.weight, self.scale, bias)


def quantize_layer(layer: nn.Module) -> None:
    """Replace a loaded linear layer's float weight with int8 + scales (both kept as parameters,
    so they count in the model's memory and move with it)."""
    q, scale = quantize_per_channel(layer.weight.data)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    layer.quant = Int8Weights(layer.weight.data, layer.weight_scale.data)
