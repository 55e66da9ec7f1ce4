"""Normalization layers. RMSNorm fuses the residual add so a decoder layer reads as a chain:
`x, residual = norm(x, residual)`; with the Triton backend that is one kernel (kernels/rms_norm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import rows_cpu
from services.worker.forward_context import use_triton_kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama/Qwen do.

    forward(x) returns the normed x; forward(x, residual) first adds the residual and returns
    (normed(x + residual), x + residual), the sum being the next residual.
    """

    has_kernel = True  # the Triton kernel implements exactly this norm

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.has_kernel and use_triton_kernels():
            return self._triton(x, residual)
        if self.has_kernel and rows_cpu.usable(x, self.weight, *(() if residual is None else (residual,))):
            return rows_cpu.rms_norm(x, self.weight, self.eps, residual)  # one pass in C, threaded
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _triton(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from kernels.rms_norm import rms_norm

        rows = x.reshape(-1, x.shape[-1])
        if residual is None:
            return rms_norm(rows, self.weight, self.eps).view(x.shape)
        out, new_residual = rms_norm(rows, self.weight, self.eps, residual.reshape(rows.shape))
        return out.view(x.shape), new_residual.view(x.shape)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op instead of pow / mean / rsqrt / mul; float32 accumulation either way
        if x.dtype == self.weight.dtype == torch.float32:  # the weight too: no casts, one op fewer
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in float32 before rounding to the input dtype."""

    has_kernel = False

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's calling convention (OPT)."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x
