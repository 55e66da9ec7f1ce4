"""Bidirectional attention for encoder models (BERT, XLM-RoBERTa): every token of a request sees
every other token of the same request, and nothing is written to a KV cache (an encoder's input
is computed whole, in one step, and pooled).

The step's flattened tokens are scattered once per step into a padded [requests, longest, ...]
layout (EncoderMetadata) and each layer runs one scaled-dot-product attention over it, with the
padding keys masked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.forward_context import get_forward_context


@dataclass
class EncoderMetadata:
    index: torch.Tensor  # [T] each token's slot in the padded [B * L] layout
    key_mask: torch.Tensor  # [B, 1, 1, L] True where a key is a real token
    num_reqs: int
    max_len: int
    token_type_ids: torch.Tensor  # [T] 0 for the first segment, 1 for a pair's second

    @classmethod
    def build(cls, query_start_loc: list[int], segment_starts: list[int], device: torch.device) -> EncoderMetadata:
        """query_start_loc: each request's first row (then the total); segment_starts: per request,
        the first token of its second segment (0: a single segment)."""
        lens = [b - a for a, b in itertools.pairwise(query_start_loc)]
        num_reqs, max_len = len(lens), max(lens)
        index = torch.cat([torch.arange(n) + i * max_len for i, n in enumerate(lens)])
        key_mask = torch.arange(max_len)[None, :] < torch.tensor(lens)[:, None]
        types = torch.cat([(torch.arange(n) >= s) & (s > 0) for n, s in zip(lens, segment_starts)]).long()
        return cls(index.to(device), key_mask[:, None, None, :].to(device), num_reqs, max_len, types.to(device))


class EncoderAttention(nn.Module):
    """Attention over each request's own tokens, in both directions; heads are this rank's share."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta: EncoderMetadata = get_forward_context().attn_metadata
        shape = (meta.num_reqs * meta.max_len, self.num_heads, self.head_dim)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H*D] -> [B, H, L, D]
            out = x.new_zeros(shape).index_copy_(0, meta.index, x.view(-1, self.num_heads, self.head_dim))
            return out.view(meta.num_reqs, meta.max_len, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=meta.key_mask)
        out = out.transpose(1, 2).reshape(shape)
        return out.index_select(0, meta.index).reshape(-1, self.num_heads * self.head_dim)
