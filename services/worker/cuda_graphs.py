"""CUDA graphs for decode-only steps: one per batch-size bucket, captured once at startup.

A decode step launches a handful of kernels per layer for one token per request, so at small
batches the GPU waits on the host's launches. A step whose every request has exactly one new
token, with B requests, instead replays the graph captured for the smallest bucket >= B. The
graph reads fixed addresses, so the step's inputs are first copied into static buffers; rows
B.. of the bucket are padding: slot -1 (the cache write skips it) and seq_len 0 (decode
attention reads nothing and writes zeros), and only the first B rows of the output are used.
Prefill, mixed steps and batches above the largest bucket run eagerly.

Graph safety: attention runs on TritonAttentionBackend.graph_decode_metadata over the static
buffers with max_seq_len = max_model_len and a split count fixed per bucket (each request spreads
its own context over the splits), so no kernel grid or argument depends on the step, and nothing
in the forward syncs with the host or builds metadata.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.stats_log import progress
from services.worker.transfer import copy_from_host
from shared.config import EngineConfig

if TYPE_CHECKING:
    from services.worker.input_batch import StepInputs
    from services.worker.layers.attention_backend import AttentionBackend, CommonAttentionMetadata
    from services.worker.layers.attention_triton import TritonAttentionBackend

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int, limit: int) -> list[int]:
    """Buckets 1, 2, 4, 8, 16, 24, ... (steps of 8) below top = min(max_batch, limit), then top
    itself, so every batch up to top has one."""
    top = max(1, min(max_batch, limit))
    return [s for s in (1, 2, 4, *range(8, top, 8)) if s < top] + [top]


def bucket_for(sizes: Sequence[int], batch: int) -> int | None:
    """The smallest of the sorted sizes >= batch; None when batch is above them all."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


def padded_seq_lens(seq_lens: Sequence[int], size: int) -> np.ndarray:
    """[size] int32: the batch's context lengths, then 0 for the padding rows."""
    out = np.zeros(size, dtype=np.int32)
    out[: len(seq_lens)] = seq_lens
    return out


def block_table_rows(block_tables: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[B, w] int32: each request's block ids zero-padded to the longest row, capped at width
    (entries past a request's blocks, or past width, are never read for seq_len <= width blocks)."""
    w = max(1, min(width, max((len(t) for t in block_tables), default=1)))
    rows = np.zeros((len(block_tables), w), dtype=np.int32)
    for i, table in enumerate(block_tables):
        n = min(len(table), w)
        rows[i, :n] = table[:n]
    return rows


def _free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def graphs_unsupported(config: EngineConfig, device: torch.device, backend: AttentionBackend) -> str | None:
    """Why decode steps must run eagerly on this worker; None when graphs can be captured."""
    if config.compilation.enforce_eager:
        return "enforce_eager is set"
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if backend.name != "triton":
        return f"the {backend.name} attention backend is not graph-safe (use triton)"
    if config.parallel.world_size > 1:
        return "tensor and pipeline parallel communication is not captured yet"
    if config.speculative is not None and config.speculative.method == "eagle3":
        return "an EAGLE-3 head reads the target's intermediate hidden states, which a graph does not keep"
    return None


class DecodeBuffers:
    """The static inputs a captured decode graph reads, for batches of up to max_batch requests."""

    def __init__(self, max_batch: int, max_model_len: int, block_size: int, device: torch.device):
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)  # blocks of the longest possible request
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, self.width, dtype=torch.int32, device=device)

    def load(self, inputs: StepInputs, size: int) -> None:
        """Copy a decode step of B <= size requests into rows :B and make rows B:size padding."""
        attn, batch = inputs.attn, inputs.attn.num_reqs
        self.input_ids[:batch].copy_(inputs.input_ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slot_mapping[:batch].copy_(attn.slot_mapping)
        self.slot_mapping[batch:size].fill_(-1)  # stale slots would overwrite other requests' KV
        # Padding rows keep stale ids and positions: earlier real values (or zeros), always in range.
        copy_from_host(self.seq_lens[:size], torch.from_numpy(padded_seq_lens(attn.seq_lens, size)))
        rows = attn.block_table[:, : self.width]
        copy_from_host(self.block_tables[:batch, : rows.shape[1]], torch.from_numpy(rows))

    def forward(
        self, model: nn.Module, backend: TritonAttentionBackend, kv_caches: list[torch.Tensor], size: int,
        num_splits: int,
    ) -> torch.Tensor:
        """The model over rows :size of the buffers ([size, hidden]): what a graph captures."""
        meta = backend.graph_decode_metadata(
            self.slot_mapping[:size], self.block_tables[:size], self.seq_lens[:size], self.max_model_len, num_splits
        )
        with set_forward_context(ForwardContext(backend, meta, kv_caches)):
            return model(self.input_ids[:size], self.positions[:size])


class DecodeGraphs:
    """One captured decode forward per bucket, sharing a memory pool and the static buffers.
    run() replays the right one for a decode-only step, or returns None for an eager step."""

    def __init__(self, config: EngineConfig, backend: TritonAttentionBackend, device: torch.device):
        s, m = config.scheduler, config.model
        self.sizes = capture_sizes(min(s.max_num_seqs, s.max_num_batched_tokens), config.compilation.max_capture_size)
        self.backend, self.device = backend, device
        self.num_kv_heads = max(1, m.num_kv_heads // config.parallel.tensor_parallel_size)
        self.max_model_len = m.max_model_len
        self.buffers = DecodeBuffers(self.sizes[-1], m.max_model_len, config.cache.block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's output rows, alive for its lifetime
        self.replays = 0
        self._pool, self._stream = None, None  # created at the first capture

    def num_splits(self, size: int) -> int:
        """The decode kernel's split count for a bucket, from max_model_len: fixed for the graph."""
        from kernels.paged_attention_decode import default_num_splits

        return default_num_splits(size, self.num_kv_heads, self.max_model_len, self.device)

    @torch.inference_mode()
    def capture(self, model: nn.Module, kv_caches: list[torch.Tensor]) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its pool memory. The
        buffers hold only padding rows meanwhile, so neither warmup nor capture writes the cache."""
        start, free_before = time.perf_counter(), _free_bytes(self.device)
        for size in progress(self.sizes[::-1], "Capturing CUDA graphs (decode)", "graph"):
            self.graphs[size], self.outputs[size] = self._capture_one(model, kv_caches, size)
        log.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.2f GiB", len(self.sizes), self.sizes[0],
            self.sizes[-1], time.perf_counter() - start, (free_before - _free_bytes(self.device)) / 2**30,
        )

    def _capture_one(
        self, model: nn.Module, kv_caches: list[torch.Tensor], size: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        splits = self.num_splits(size)
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        # Warm up eagerly on the capture stream: Triton compiles and loads this size's kernels and
        # cuBLAS sets up its workspace for the stream; neither may happen while capturing.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self.buffers.forward(model, self.backend, kv_caches, size, splits)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            out = self.buffers.forward(model, self.backend, kv_caches, size, splits)
        torch.cuda.synchronize(self.device)
        return graph, out

    def bucket(self, attn: CommonAttentionMetadata) -> int | None:
        """The bucket a step replays: decode-only steps within the largest bucket, else None."""
        if attn.num_reqs == 0 or attn.num_decodes != attn.num_reqs:
            return None
        if max(attn.seq_lens) > self.max_model_len:  # never scheduled; the table width assumes it
            return None
        return bucket_for(self.sizes, attn.num_reqs)

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Hidden states [B, hidden] of a decode-only step through its bucket's graph; None when
        the step must run eagerly. Valid until the next run()."""
        size = self.bucket(inputs.attn)
        if size is None:
            return None
        self.buffers.load(inputs, size)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][: inputs.attn.num_reqs]


def capture_decode_graphs(
    config: EngineConfig, device: torch.device, backend: AttentionBackend, model: nn.Module,
    kv_caches: list[torch.Tensor],
) -> DecodeGraphs | None:
    """Decode graphs captured over the allocated KV cache, or None (with the reason logged) when
    every step runs eagerly."""
    reason = graphs_unsupported(config, device, backend)
    if reason is not None:
        (log.debug if device.type == "cpu" else log.info)("decode steps run eagerly: %s", reason)
        return None
    graphs = DecodeGraphs(config, backend, device)
    graphs.capture(model, kv_caches)
    return graphs
