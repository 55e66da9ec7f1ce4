"""The Triton KV write and attention kernels over an fp8 cache, against their torch references.

The write kernel quantizes (value / scale, saturated) and the attention kernels read fp8 back
times the layer's scales. Triton's CPU interpreter rounds float32 -> fp8 wrongly in places (ties
away from zero, and a round-up that carries into the exponent can halve the value), so the write
test feeds values that are exact in fp8 after scaling by a power of two: the bytes must then
match the reference exactly, which checks the scaling, saturation and slots; on CUDA the
hardware conversion rounds to nearest even as torch does. Attention reads one cache in both
kernel and reference, so it is compared as float32 outputs are.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, random_paged_cache

pytest.importorskip("triton")

from kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref
from kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref
from kernels.paged_attention_prefill import paged_attention_prefill, paged_attention_prefill_ref

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _exact(shape: tuple[int, ...], dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Random values that are exact in fp8 `dtype` once divided by scale (a power of two)."""
    return (torch.randn(shape) * 4).to(dtype).float().to(DEVICE) * scale


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_write_quantizes_like_the_reference(dtype):
    num_tokens, heads, dim, block = 7, 2, 16, 16
    k, v = _exact((num_tokens, heads, dim), dtype, 0.0625), _exact((num_tokens, heads, dim), dtype, 4.0)
    k[0, 0, 0] = 1e9  # saturates at the largest finite fp8 value, never inf or NaN
    v[2, 1, 3] = -1e9
    slots = torch.tensor([3, -1, 0, 17, 31, 8, 20], device=DEVICE)  # -1: a padding token, skipped
    cache = torch.zeros(2, 2, block, heads, dim, device=DEVICE, dtype=dtype)
    expected = cache.clone()
    kv_cache_write(k, v, cache, slots, k_scale=0.0625, v_scale=4.0)
    kv_cache_write_ref(k, v, expected, slots, k_scale=0.0625, v_scale=4.0)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    got = cache.float()
    assert got[0].flatten(0, 1)[3, 0, 0] == torch.finfo(dtype).max
    assert got[1].flatten(0, 1)[0, 1, 3] == -torch.finfo(dtype).max
    keep = slots >= 0
    read = got[1].flatten(0, 1)[slots[keep]] * 4.0  # read back times the scale: the inputs
    v[2, 1, 3] = -torch.finfo(dtype).max * 4.0
    assert torch.equal(read, v[keep])


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_reads_fp8_with_scales(dtype, num_splits):
    seq_lens, heads, kv_heads, dim = [5, 40, 70], 4, 2, 16
    cache, table = random_paged_cache(seq_lens, 16, kv_heads, dim, dtype)
    q = torch.randn(len(seq_lens), heads, dim, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_attention_decode(q, cache, table, lens, 0.25, num_splits=num_splits, k_scale=0.5, v_scale=3.0)
    expected = paged_attention_decode_ref(q, cache, table, lens, 0.25, k_scale=0.5, v_scale=3.0)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    unscaled = paged_attention_decode_ref(q, cache, table, lens, 0.25)
    assert not torch.allclose(out, unscaled, atol=0.1)  # the scales are applied, not ignored


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_prefill_reads_fp8_with_scales(dtype):
    seq_lens, q_lens, heads, kv_heads, dim = [20, 33], [20, 9], 4, 2, 16  # a fresh prompt, a chunk
    cache, table = random_paged_cache(seq_lens, 16, kv_heads, dim, dtype)
    q = torch.randn(sum(q_lens), heads, dim, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=DEVICE)
    out = paged_attention_prefill(q, cache, table, lens, qsl, 0.25, k_scale=2.0, v_scale=0.25)
    expected = paged_attention_prefill_ref(q, cache, table, lens, qsl, 0.25, k_scale=2.0, v_scale=0.25)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_scales_must_be_positive():
    cache = torch.zeros(2, 1, 16, 2, 16, device=DEVICE, dtype=torch.float8_e4m3fn)
    k = torch.randn(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale and v_scale must be positive"):
        kv_cache_write(k, k, cache, torch.zeros(1, dtype=torch.int64, device=DEVICE), k_scale=0.0)
