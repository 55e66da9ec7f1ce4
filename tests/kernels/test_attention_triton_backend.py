"""TritonAttentionBackend against TorchAttentionBackend on one mixed decode + prefill step."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES

pytest.importorskip("triton")

from services.worker.layers.attention import CommonAttentionMetadata
from services.worker.layers.attention_torch import TorchAttentionBackend
from services.worker.layers.attention_triton import TritonAttentionBackend

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 4, 2, 32
# (new tokens, context after the step): two decodes, then a chunk after a cached prefix,
# a fresh prompt and a one-token chunk.
REQUESTS = [(1, 17), (1, 40), (20, 50), (9, 9), (1, 33)]
NUM_DECODES = 2
# speculative decoding's verify shapes: k + 1 query tokens after a cached context (crossing block
# boundaries), beside plain decodes
VERIFY_REQUESTS = [(1, 30), (1, 16), (4, 21), (6, 48), (2, 17), (5, 33)]


def _metadata(requests: list[tuple[int, int]], num_decodes: int) -> CommonAttentionMetadata:
    perm = torch.randperm(20).tolist()
    block_tables, slots, qsl = [], [], [0]
    for q_len, seq_len in requests:
        table = [perm.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        block_tables.append(table)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        seq_lens=[r[1] for r in requests],
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        num_decodes=num_decodes,
        block_size=BLOCK_SIZE,
        device=DEVICE,
    )


@pytest.mark.parametrize(("requests", "num_decodes"), [(REQUESTS, NUM_DECODES), (VERIFY_REQUESTS, 2)],
                         ids=["mixed", "verify"])
def test_mixed_batch_matches_torch_backend(requests, num_decodes):
    common = _metadata(requests, num_decodes)
    num_tokens = common.query_start_loc[-1]
    cache = torch.randn(2, 20, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)  # holds cached prefixes
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=DEVICE)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    results = {}
    for backend in (TorchAttentionBackend(), TritonAttentionBackend(DEVICE)):
        kv_cache = cache.clone()
        meta = backend.build(common)
        out = backend.forward(q, k, v, kv_cache, meta, HEAD_DIM**-0.5)
        results[backend.name] = (out, kv_cache)
    (out_torch, cache_torch), (out_triton, cache_triton) = results["torch"], results["triton"]
    assert torch.equal(cache_triton, cache_torch)
    assert out_triton.shape == (num_tokens, NUM_HEADS, HEAD_DIM)
    torch.testing.assert_close(out_triton, out_torch, **TOLERANCES[torch.float32])


def test_decode_only_and_prefill_only_steps():
    for num_decodes, requests in ((3, [(1, 5), (1, 16), (1, 70)]), (0, [(12, 12), (4, 30)])):
        qsl = [0]
        for q_len, _ in requests:
            qsl.append(qsl[-1] + q_len)
        tables = [[i * 5 + j for j in range(5)] for i in range(len(requests))]
        slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                 for t, (q_len, n) in zip(tables, requests) for p in range(n - q_len, n)]
        common = CommonAttentionMetadata(
            qsl, [n for _, n in requests], tables, torch.tensor(slots, device=DEVICE), num_decodes, BLOCK_SIZE, DEVICE
        )
        cache = torch.randn(2, 15, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
        q = torch.randn(qsl[-1], NUM_HEADS, HEAD_DIM, device=DEVICE)
        k = torch.randn(qsl[-1], NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
        outs = []
        for backend in (TorchAttentionBackend(), TritonAttentionBackend(DEVICE)):
            outs.append(backend.forward(q, k, k, cache.clone(), backend.build(common), 0.2))
        torch.testing.assert_close(outs[1], outs[0], **TOLERANCES[torch.float32])


def test_constructor_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA devices"):
        TritonAttentionBackend(torch.device("cpu"))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_graph_decode_metadata_with_padding_rows(num_splits):
    """The CUDA-graph form of a decode batch: static buffers padded past the real rows with slot -1
    and seq_len 0, a table as wide as max_model_len and max_seq_len = max_model_len. Real rows
    match the eager build, padding rows write no cache and attend to nothing (zeros, no NaN)."""
    requests, padded, max_model_len = [(1, 17), (1, 40), (1, 33)], 5, 80
    width = -(-max_model_len // BLOCK_SIZE)
    perm = torch.randperm(20).tolist()
    tables = [[perm.pop() for _ in range(-(-n // BLOCK_SIZE))] for _, n in requests]
    seq_lens = [n for _, n in requests]
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(tables, seq_lens)]
    common = CommonAttentionMetadata(
        [0, 1, 2, 3], seq_lens, tables, torch.tensor(slots, device=DEVICE), 3, BLOCK_SIZE, DEVICE
    )
    static_slots = torch.full((padded,), -1, dtype=torch.int64, device=DEVICE)
    static_slots[:3] = torch.tensor(slots)
    static_lens = torch.zeros(padded, dtype=torch.int32, device=DEVICE)
    static_lens[:3] = torch.tensor(seq_lens, dtype=torch.int32)
    static_tables = torch.full((padded, width), 7, dtype=torch.int32, device=DEVICE)  # stale entries
    for i, t in enumerate(tables):
        static_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    cache = torch.randn(2, 20, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    q = torch.randn(padded, NUM_HEADS, HEAD_DIM, device=DEVICE)
    k = torch.randn(padded, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    backend = TritonAttentionBackend(DEVICE)
    eager_cache, graph_cache = cache.clone(), cache.clone()
    eager = backend.forward(q[:3], k[:3], k[:3], eager_cache, backend.build(common), 0.2)
    meta = backend.graph_decode_metadata(static_slots, static_tables, static_lens, max_model_len, num_splits)
    out = backend.forward(q, k, k, graph_cache, meta, 0.2)
    assert torch.equal(graph_cache, eager_cache)
    torch.testing.assert_close(out[:3], eager, **TOLERANCES[torch.float32])
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    with pytest.raises(ValueError, match="rows everywhere"):
        backend.graph_decode_metadata(static_slots, static_tables[:3], static_lens, max_model_len, num_splits)



def test_graph_query_metadata_pads_requests_and_tokens():
    """The CUDA-graph form of a verify step: the step's tokens first, then padding tokens (slot -1)
    up to size x q, padding requests with no tokens and seq_len 0. Real rows match the eager build;
    padding writes no cache and comes out as zeros."""
    size, q = 8, 6
    common = _metadata(VERIFY_REQUESTS, 2)
    batch, tokens = len(VERIFY_REQUESTS), common.query_start_loc[-1]
    width = 5
    static_slots = torch.full((size * q,), -1, dtype=torch.int64, device=DEVICE)
    static_slots[:tokens] = common.slot_mapping
    static_lens = torch.zeros(size, dtype=torch.int32, device=DEVICE)
    static_lens[:batch] = torch.tensor(common.seq_lens, dtype=torch.int32)
    static_tables = torch.full((size, width), 7, dtype=torch.int32, device=DEVICE)  # stale entries
    static_tables[:batch, : common.block_table.shape[1]] = torch.from_numpy(common.block_table)
    qsl = torch.full((size + 1,), tokens, dtype=torch.int32, device=DEVICE)
    qsl[: batch + 1] = torch.tensor(common.query_start_loc, dtype=torch.int32)
    cache = torch.randn(2, 20, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    q_all = torch.randn(size * q, NUM_HEADS, HEAD_DIM, device=DEVICE)
    k_all = torch.randn(size * q, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    backend = TritonAttentionBackend(DEVICE)
    eager_cache, graph_cache = cache.clone(), cache.clone()
    eager = backend.forward(q_all[:tokens], k_all[:tokens], k_all[:tokens], eager_cache, backend.build(common), 0.2)
    meta = backend.graph_query_metadata(static_slots, static_tables, static_lens, qsl, q)
    out = backend.forward(q_all, k_all, k_all, graph_cache, meta, 0.2)
    assert torch.equal(graph_cache, eager_cache)
    torch.testing.assert_close(out[:tokens], eager, **TOLERANCES[torch.float32])
    assert torch.equal(out[tokens:], torch.zeros_like(out[tokens:]))
    with pytest.raises(ValueError, match="requests everywhere"):
        backend.graph_query_metadata(static_slots, static_tables[:3], static_lens, qsl, q)
    with pytest.raises(ValueError, match="8 x 6 slots"):
        backend.graph_query_metadata(static_slots[:10], static_tables, static_lens, qsl, q)
