"""Dynamic per-token activation quantization (the A8 of W8A8), emulated: each row of a linear layer's
input is quantized with its own scale, amax(|row|) over the type's largest value (int8: round and
clamp to +-127; fp8 e4m3: cast, saturating at +-448), then dequantized before the matmul. The
product then carries the same rounding as an 8-bit x 8-bit GEMM with per-token and per-channel
scales, computed here by the layer's weight-only path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INT8_MAX = 127.0
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def fake_quantize_per_token(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x with each row quantized to int8 or fp8 (e4m3) and back, in x's dtype."""
    xf = x.float()
    limit = INT8_MAX if kind == "int" else FP8_MAX
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
    scaled = (xf / scale).clamp_(-limit, limit)
    q = scaled.round_() if kind == "int" else scaled.to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


class PerTokenActivationQuant:
    """A layer's matmul with its input quantized per token first (W8A8 over a weight-only matmul)."""

    def __init__(self, matmul: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], kind: str):
        if kind not in ("int", "float"):
            raise ValueError(f"activation quantization type must be int or float, got {kind!r}")
        self.matmul, self.kind = matmul, kind

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.matmul(fake_quantize_per_token(x, self.kind), bias)
