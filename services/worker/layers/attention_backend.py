"""What an attention backend is: the per-step metadata every backend starts from and the
interface it implements. A leaf module (torch only), so the forward context, the attention layer
and the backends can all depend on it without depending on each other.

KV cache layout, per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 holds keys, 1 values). A token at position p of a request lives in slot
block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


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
    # [B, W] int32: block_tables zero-padded to the longest, built once per step for every
    # backend and the CUDA graphs (rows past a request's blocks are never read)
    block_table: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        width = max(1, max((len(t) for t in self.block_tables), default=1))
        self.block_table = np.zeros((len(self.block_tables), width), dtype=np.int32)
        for i, blocks in enumerate(self.block_tables):
            self.block_table[i, : len(blocks)] = blocks

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    name: str

    def build(self, common: CommonAttentionMetadata) -> Any:
        """Precompute per-step tensors once; the result is shared by every layer."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any, scale: float,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D]) into kv_cache at the slot mapping, then attend q ([T, H, D])
        over each request's cached context. Returns [T, H, D]. An fp8 kv_cache stores k / k_scale
        and v / v_scale; a cache in q's dtype ignores the scales."""
