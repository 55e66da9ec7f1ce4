"""kv_cache_write scatters K/V into the paged cache exactly as its reference, skipping padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref


def _slots(num_tokens: int, num_blocks: int, block_size: int, device) -> torch.Tensor:
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[1] = -1  # a padding token
    return slots.to(device)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, block_size, dtype):
    num_tokens, num_kv_heads, head_dim, num_blocks = 9, 2, 16, 5
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    expected = cache.clone()
    slots = _slots(num_tokens, num_blocks, block_size, device)
    kv_cache_write(k, v, cache, slots)
    kv_cache_write_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


def test_strided_views_of_fused_qkv(device):
    """k and v sliced out of one [T, (H + 2 Hkv) * D] projection are written without copies."""
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 6, 4, 2, 32, 16
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k, v = k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim)
    assert not k.is_contiguous()
    cache = torch.zeros(2, 3, block_size, num_kv_heads, head_dim, device=device)
    expected = cache.clone()
    slots = _slots(num_tokens, 3, block_size, device)
    kv_cache_write(k, v, cache, slots)
    kv_cache_write_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


def test_rejects_bad_arguments(device):
    k = torch.randn(4, 2, 16, device=device)
    cache = torch.zeros(2, 2, 16, 2, 16, device=device)
    slots = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        kv_cache_write(k, k, cache, slots.int())
    with pytest.raises(ValueError, match="kv_cache must be"):
        kv_cache_write(k, k, torch.zeros(2, 2, 16, 4, 16, device=device), slots)
    with pytest.raises(ValueError, match="contiguous last dim"):
        kv_cache_write(k.transpose(1, 2).contiguous().transpose(1, 2), k, cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        kv_cache_write(k, k, cache, slots[:3])
