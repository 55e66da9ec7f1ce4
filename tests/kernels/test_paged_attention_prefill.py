"""Prefill attention against its torch reference: fresh prompts, chunks after a cached prefix,
ragged query lengths in one batch, GQA and both block sizes."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, random_paged_cache, skip_unsupported

pytest.importorskip("triton")

from kernels.paged_attention_prefill import paged_attention_prefill, paged_attention_prefill_ref

# (query tokens this step, context length after it): a fresh prompt, a chunk after a cached
# prefix that ends mid-block, a one-token chunk, and a prompt longer than one query tile.
MIXED = [(5, 5), (30, 70), (1, 40), (45, 45)]


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(4, 2, 16, 16), (2, 2, 32, 32), (6, 2, 16, 32), (8, 1, 16, 16)],
    ids=["gqa2-bs16", "mha-bs32", "gqa3-bs32", "mqa-bs16"],
)
def test_matches_reference_fp32(num_heads, num_kv_heads, head_dim, block_size):
    _check(MIXED, num_heads, num_kv_heads, head_dim, block_size, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half(dtype):
    skip_unsupported(dtype, uses_dot=True)
    _check([(7, 20), (12, 12)], 4, 2, 32, 16, dtype)


def test_chunked_prefill_equals_whole_prompt():
    """Running a prompt as two chunks (the second reading the first through the cache) gives
    the same outputs as running it whole."""
    length, split, num_heads, num_kv_heads, head_dim = 40, 23, 4, 2, 16
    cache, table = random_paged_cache([length], 16, num_kv_heads, head_dim, torch.float32)
    q = torch.randn(length, num_heads, head_dim, device=DEVICE)

    def run(queries: torch.Tensor, seq_len: int) -> torch.Tensor:
        lens = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
        qsl = torch.tensor([0, queries.shape[0]], dtype=torch.int32, device=DEVICE)
        return paged_attention_prefill(queries, cache, table, lens, qsl, 0.3)

    whole, first, second = run(q, length), run(q[:split], split), run(q[split:], length)
    torch.testing.assert_close(torch.cat([first, second]), whole, **TOLERANCES[torch.float32])


def _check(reqs, num_heads, num_kv_heads, head_dim, block_size, dtype):
    q_lens, seq_lens = [r[0] for r in reqs], [r[1] for r in reqs]
    cache, table = random_paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=DEVICE).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = paged_attention_prefill(q, cache, table, lens, qsl, scale, max_query_len=max(q_lens))
    expected = paged_attention_prefill_ref(q, cache, table, lens, qsl, scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])


def test_rejects_bad_arguments():
    cache, table = random_paged_cache([4], 16, 2, 16, torch.float32)
    q = torch.randn(4, 4, 16, device=DEVICE)
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc must have shape"):
        paged_attention_prefill(q, cache, table, lens, torch.tensor([0], dtype=torch.int32, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="query_start_loc dtype"):
        paged_attention_prefill(q, cache, table, lens, torch.tensor([0, 4], device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        paged_attention_prefill(q.flatten(1), cache, table, lens, torch.tensor([0, 4], dtype=torch.int32), 1.0)
