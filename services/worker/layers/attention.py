"""The attention layer and the backend interface it dispatches to.

KV cache layout, per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 holds keys, 1 values). A token at position p of a request lives in slot
block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from services.worker.forward_context import get_forward_context


@dataclass
class CommonAttentionMetadata:
    """What every backend needs for one step. Requests are ordered decodes first (one query
    token each), then prefill chunks; tokens are flattened in that order."""

    query_start_loc: list[int]  # len B + 1, cumulative query tokens
    seq_lens: list[int]  # len B, context length after this step (cached + new tokens)
    block_tables: list[list[int]]  # len B, block ids of each request
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    num_decodes: int  # the first num_decodes requests have exactly one query token
    block_size: int
    device: torch.device

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    name: str

    def build(self, common: CommonAttentionMetadata) -> Any:
        """Precompute per-step tensors once; the result is shared by every layer."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any, scale: float
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D]) into kv_cache at the slot mapping, then attend q ([T, H, D])
        over each request's cached context. Returns [T, H, D]."""


BACKENDS = ("torch", "triton")


def select_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """PAGEDSERVE_ATTENTION_BACKEND=torch|triton overrides the default (triton on CUDA, torch on CPU)."""
    name = os.environ.get("PAGEDSERVE_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"PAGEDSERVE_ATTENTION_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        from services.worker.layers.attention_torch import TorchAttentionBackend

        return TorchAttentionBackend(dtype)
    from services.worker.layers.attention_triton import TritonAttentionBackend

    return TritonAttentionBackend(device)


class Attention(nn.Module):
    """Paged attention over flattened tokens; heads are this tensor-parallel rank's share."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.layer_idx = scale, layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        out = ctx.backend.forward(
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata,
            self.scale,
        )
        return out.reshape(-1, self.num_heads * self.head_dim)
