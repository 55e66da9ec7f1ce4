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


def _metadata() -> CommonAttentionMetadata:
    perm = torch.randperm(20).tolist()
    block_tables, slots, qsl = [], [], [0]
    for q_len, seq_len in REQUESTS:
        table = [perm.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        block_tables.append(table)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        seq_lens=[r[1] for r in REQUESTS],
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        num_decodes=NUM_DECODES,
        block_size=BLOCK_SIZE,
        device=DEVICE,
    )


def test_mixed_batch_matches_torch_backend():
    common = _metadata()
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
