"""The worker's paged KV cache tensors: their size per block and their allocation."""

from __future__ import annotations

import torch

from services.worker import huge_pages
from services.worker.pipeline import stage_layers
from shared.config import EngineConfig


def _kv_heads(config: EngineConfig) -> int:
    return max(1, config.model.num_kv_heads // config.parallel.tensor_parallel_size)


def _layers(config: EngineConfig) -> range:
    """The layers whose KV this rank keeps: its pipeline stage's."""
    p = config.parallel
    return stage_layers(config.model.num_layers, p.pp_rank, p.pipeline_parallel_size)


def kv_block_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes one KV block takes on this rank, keys and values of every layer it holds."""
    m = config.model
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * len(_layers(config)) * config.cache.block_size * _kv_heads(config) * m.head_dim * itemsize


def allocate_kv_cache(
    config: EngineConfig, num_blocks: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer (an empty one
    for a layer of another pipeline stage)."""
    m, held = config.model, _layers(config)
    shape = (2, num_blocks, config.cache.block_size, _kv_heads(config), m.head_dim)
    # zeros, not empty: padded key positions are masked, but 0 * NaN garbage would still leak
    if torch.device(device).type == "cpu":  # attention reads blocks all over the cache: huge pages
        caches = iter(huge_pages.zeros_like_each([shape] * len(held), dtype))
        return [next(caches) if i in held else torch.zeros(0, dtype=dtype) for i in range(m.num_layers)]
    return [torch.zeros(shape if i in held else (0,), dtype=dtype, device=device) for i in range(m.num_layers)]


def cache_bytes(kv_caches: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in kv_caches)
