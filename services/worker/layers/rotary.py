"""Rotary position embedding (neox style: the two halves of each head rotate together, as in
HF Llama/Qwen), applied to flattened q/k [T, H*D] at positions [T].

Supports the default rope and Llama 3 frequency scaling ("llama3"). The cos/sin tables are
computed once, in float32, for every position up to the model's maximum length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kernels import rows_cpu
from services.worker.forward_context import use_triton_kernels

ROPE_TYPES = ("default", "llama3")


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from a raw config.json: transformers-5 `rope_parameters`, or the older
    top-level `rope_theta` plus `rope_scaling` (whose type key was once `type`)."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """The head_dim / 2 rotation frequencies (float32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (float(params["rope_theta"]) ** exponents)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, params)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


def _llama3_scaling(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Wavelengths longer than the original context / low_freq_factor are stretched by `factor`,
    # those shorter than original / high_freq_factor are kept, and the band between blends the
    # two linearly in (original context / wavelength).
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions; one instance can be shared by every layer. With the
    Triton backend the rotation is one in-place kernel for q and k (kernels/rotary.py); float32 or
    bfloat16 on the CPU, the C op of kernels/rows_cpu.py, in place too."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]):
        super().__init__()
        self.head_dim = head_dim
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inverse_frequencies(head_dim, params))
        # [max_position, D]: cos in the first D/2 columns, sin in the rest (the kernel's layout)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
        self._looked_up: tuple | None = None  # (positions, dtype, cos, sin) of the last lookup

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton_kernels():
            from kernels.rotary import rotary_embedding

            return rotary_embedding(positions, q, k, self.cos_sin_cache)
        if (rows_cpu.usable(q, k) and self.cos_sin_cache.dtype == torch.float32
                and all(t.dim() == 2 and t.stride(-1) == 1 for t in (q, k))):
            # in place, as the Triton kernel: q and k are fresh (views of this layer's projection)
            table = self.cos_sin_cache
            return rows_cpu.rotary(positions, q, self.head_dim, table), rows_cpu.rotary(positions, k, self.head_dim, table)
        cos, sin = self._cos_sin(positions, q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D/2] cos and sin at positions, looked up once per forward: every layer shares this
        module and passes the same positions tensor (a new one each step, never written in place)."""
        last = self._looked_up
        if last is None or last[0] is not positions or last[1] != dtype:
            cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
            last = self._looked_up = (positions, dtype, cos, sin)
        return last[2], last[3]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.head_dim))
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
