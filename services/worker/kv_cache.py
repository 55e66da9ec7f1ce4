"""The worker's paged KV cache tensors: their size per block and their allocation."""

from __future__ import annotations

import torch

from shared.config import EngineConfig


def _kv_heads(config: EngineConfig) -> int:
    return max(1, config.model.num_kv_heads // config.parallel.tensor_parallel_size)


def kv_block_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes one KV block takes on this rank, keys and values of every layer."""
    m = config.model
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * m.num_layers * config.cache.block_size * _kv_heads(config) * m.head_dim * itemsize


def allocate_kv_cache(
    config: EngineConfig, num_blocks: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer."""
    m = config.model
    shape = (2, num_blocks, config.cache.block_size, _kv_heads(config), m.head_dim)
    # zeros, not empty: padded key positions are masked, but 0 * NaN garbage would still leak
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(m.num_layers)]


def cache_bytes(kv_caches: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in kv_caches)
