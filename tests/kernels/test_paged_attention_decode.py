"""Decode attention against its torch reference: GQA, block sizes, ragged lengths, split-K."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, random_paged_cache, skip_unsupported

pytest.importorskip("triton")

from kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref
from kernels.paged_attention_prefill import paged_attention_prefill

SEQ_LENS = [1, 37, 96, 130]  # a lone token, ragged, a whole number of blocks, several tiles


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(4, 2, 16, 16), (4, 4, 32, 32), (6, 2, 16, 32), (8, 1, 32, 16)],
    ids=["gqa2-bs16", "mha-bs32", "gqa3-bs32", "mqa-bs16"],
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference_fp32(num_heads, num_kv_heads, head_dim, block_size, num_splits):
    _check(SEQ_LENS, num_heads, num_kv_heads, head_dim, block_size, torch.float32, num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_matches_reference_half(dtype, num_splits):
    skip_unsupported(dtype, uses_dot=True)
    _check([5, 70], 4, 2, 32, 16, dtype, num_splits)


def test_default_splits_and_head_dim_64():
    """The split heuristic (num_splits=None) on a head size used by real models."""
    _check([3, 200], 2, 1, 64, 16, torch.float32, None)


def _check(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    cache, table = random_paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = paged_attention_decode(q, cache, table, lens, scale, num_splits=num_splits)
    expected = paged_attention_decode_ref(q, cache, table, lens, scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])


def test_agrees_with_prefill_kernel_on_single_tokens():
    """A decode batch is a prefill batch whose requests have one query token each."""
    seq_lens, num_heads, num_kv_heads, head_dim = [9, 33, 64], 4, 2, 16
    cache, table = random_paged_cache(seq_lens, 16, num_kv_heads, head_dim, torch.float32)
    q = torch.randn(3, num_heads, head_dim, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    decode = paged_attention_decode(q, cache, table, lens, 0.25, num_splits=2)
    prefill = paged_attention_prefill(q, cache, table, lens, qsl, 0.25)
    torch.testing.assert_close(decode, prefill, **TOLERANCES[torch.float32])


def test_rejects_bad_arguments():
    cache, table = random_paged_cache([4, 4], 16, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    lens = torch.tensor([4, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_decode(torch.randn(2, 3, 16, device=DEVICE), cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables dtype"):
        paged_attention_decode(q, cache, table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="kv_cache dtype"):
        paged_attention_decode(q, cache.half(), table, lens, 1.0)
    with pytest.raises(ValueError, match="cannot hold"):
        paged_attention_decode(q, cache, table, lens, 1.0, max_seq_len=100)
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        paged_attention_decode(q, cache, table, lens[:1], 1.0)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_request_gives_zeros(num_splits):
    """A padded batch row (seq_len 0) reads nothing and writes zeros, never NaN."""
    cache, table = random_paged_cache([80, 1], 16, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    lens = torch.tensor([80, 0], dtype=torch.int32, device=DEVICE)
    out = paged_attention_decode(q, cache, table, lens, 0.25, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, paged_attention_decode_ref(q, cache, table, lens, 0.25), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 4])
def test_balanced_splits_over_a_graph_sized_grid(num_splits):
    """CUDA-graph mode: max_seq_len is max_model_len (far above every request), the split count is
    fixed and each request spreads its own context over the splits; padding rows have seq_len 0."""
    seq_lens, max_model_len = [1, 37, 300, 0, 64, 0], 512
    cache, table = random_paged_cache([max(n, 1) for n in seq_lens], 16, 2, 16, torch.float32)
    wide = torch.zeros(len(seq_lens), max_model_len // 16, dtype=torch.int32, device=DEVICE)
    wide[:, : table.shape[1]] = table.clamp(min=0)
    q = torch.randn(len(seq_lens), 4, 16, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_attention_decode(
        q, cache, wide, lens, 0.25, max_seq_len=max_model_len, num_splits=num_splits, balance_splits=True
    )
    torch.testing.assert_close(out, paged_attention_decode_ref(q, cache, wide, lens, 0.25), **TOLERANCES[torch.float32])
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(out[5], torch.zeros_like(out[5]))
