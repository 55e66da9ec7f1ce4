"""The attention layer and the choice of backend it dispatches to (the backend interface and its
per-step metadata live in attention_backend.py)."""

from __future__ import annotations

import torch
from torch import nn

from services.worker.forward_context import get_forward_context
from services.worker.layers.attention_backend import AttentionBackend, CommonAttentionMetadata
from shared.config import ATTENTION_BACKENDS

__all__ = ["Attention", "AttentionBackend", "CommonAttentionMetadata", "select_backend"]


def select_backend(
    device: torch.device, dtype: torch.dtype = torch.float32, name: str | None = None, kv_dtype: torch.dtype | None = None
) -> AttentionBackend:
    """The backend `name` (CompilationConfig.attention_backend), by default triton on CUDA and torch
    on CPU; kv_dtype: the cache's dtype when it is not the model's (fp8)."""
    name = name or ("triton" if device.type == "cuda" else "torch")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"the attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "torch":
        from services.worker.layers.attention_torch import TorchAttentionBackend

        return TorchAttentionBackend(dtype, kv_dtype)
    from services.worker.layers.attention_triton import TritonAttentionBackend

    return TritonAttentionBackend(device)


class Attention(nn.Module):
    """Paged attention over flattened tokens; heads are this tensor-parallel rank's share.
    k_scale / v_scale scale an fp8 KV cache (from the checkpoint, or measured at startup)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.layer_idx = scale, layer_idx
        self.k_scale = self.v_scale = 1.0
        self.kv_scales_from_checkpoint = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        out = ctx.backend.forward(
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata,
            self.scale,
            self.k_scale,
            self.v_scale,
        )
        return out.reshape(-1, self.num_heads * self.head_dim)
