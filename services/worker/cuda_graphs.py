"""CUDA graphs for decode and verify steps: one per (batch-size bucket, query length), captured
once at startup.

A decode step launches a handful of kernels per layer for one token per request, so at small
batches the GPU waits on the host's launches. A step whose every request has exactly one new
token, with B requests, instead replays the graph captured for the smallest bucket >= B. With
speculative decoding, a step whose requests have up to q = 1 + num_speculative_tokens new tokens
each (verifying their proposals) replays the graph of its bucket captured for q tokens per request.
The graph reads fixed addresses, so the step's inputs are first copied into static buffers: its
tokens into the first rows, then padding tokens (slot -1: the cache write skips them); requests
B.. of the bucket are padding (seq_len 0: attention reads nothing and writes zeros), and only the
step's rows of the output are used. Prefill, mixed steps with longer chunks and batches above the
largest bucket run eagerly.

Graph safety: attention runs on TritonAttentionBackend.graph_decode_metadata (q = 1: the decode
kernel with max_seq_len = max_model_len and a split count fixed per bucket, each request spreading
its own context over the splits) or graph_query_metadata (q > 1: the prefill kernel, its grid fixed
by the bucket and q) over the static buffers, so no kernel grid or argument depends on the step,
and nothing in the forward syncs with the host or builds metadata.
"""

from __future__ import annotations

import bisect
import itertools
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
    """The static inputs a captured graph reads, for up to max_batch requests and max_tokens tokens."""

    def __init__(self, max_batch: int, max_model_len: int, block_size: int, device: torch.device,
                 max_tokens: int | None = None):
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)  # blocks of the longest possible request
        tokens = max_tokens or max_batch
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, self.width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)

    def load(self, inputs: StepInputs, size: int, q: int = 1) -> None:
        """Copy a step of B <= size requests of up to q tokens each into the first rows; the rest
        of the size requests and size * q tokens become padding."""
        attn, batch, tokens = inputs.attn, inputs.attn.num_reqs, len(inputs.input_ids)
        self.input_ids[:tokens].copy_(inputs.input_ids)
        self.positions[:tokens].copy_(inputs.positions)
        self.slot_mapping[:tokens].copy_(attn.slot_mapping)
        self.slot_mapping[tokens : size * q].fill_(-1)  # stale slots would overwrite other requests' KV
        # Padding tokens keep stale ids and positions: earlier real values (or zeros), always in range.
        copy_from_host(self.seq_lens[:size], torch.from_numpy(padded_seq_lens(attn.seq_lens, size)))
        rows = attn.block_table[:, : self.width]
        copy_from_host(self.block_tables[:batch, : rows.shape[1]], torch.from_numpy(rows))
        if q > 1:
            qsl = np.full(size + 1, tokens, dtype=np.int32)  # padding requests own no tokens
            qsl[: batch + 1] = attn.query_start_loc
            copy_from_host(self.query_start_loc[: size + 1], torch.from_numpy(qsl))

    def forward(
        self, model: nn.Module, backend: TritonAttentionBackend, kv_caches: list[torch.Tensor], size: int,
        num_splits: int, q: int = 1,
    ) -> torch.Tensor:
        """The model over the buffers' size requests of q tokens ([size * q, hidden]): what a graph captures."""
        tokens = size * q
        if q == 1:
            meta = backend.graph_decode_metadata(
                self.slot_mapping[:size], self.block_tables[:size], self.seq_lens[:size], self.max_model_len,
                num_splits,
            )
        else:
            meta = backend.graph_query_metadata(
                self.slot_mapping[:tokens], self.block_tables[:size], self.seq_lens[:size],
                self.query_start_loc[: size + 1], q,
            )
        with set_forward_context(ForwardContext(backend, meta, kv_caches)):
            return model(self.input_ids[:tokens], self.positions[:tokens])


def query_lengths(config: EngineConfig) -> list[int]:
    """The tokens per request graphs are captured for: 1, and 1 + num_speculative_tokens with
    speculative decoding (a verify step)."""
    spec = config.speculative
    return [1] if spec is None or not spec.num_speculative_tokens else [1, 1 + spec.num_speculative_tokens]


class DecodeGraphs:
    """One captured forward per (bucket, query length), sharing a memory pool and the static
    buffers. run() replays the right one for a decode or verify step, or returns None for an
    eager step."""

    def __init__(self, config: EngineConfig, backend: TritonAttentionBackend, device: torch.device):
        s, m = config.scheduler, config.model
        limit = config.compilation.max_capture_size
        self.sizes = {q: capture_sizes(min(s.max_num_seqs, s.max_num_batched_tokens // q), limit)
                      for q in query_lengths(config) if s.max_num_batched_tokens >= q}
        self.backend, self.device = backend, device
        self.num_kv_heads = max(1, m.num_kv_heads // config.parallel.tensor_parallel_size)
        self.max_model_len = m.max_model_len
        max_batch = max(sizes[-1] for sizes in self.sizes.values())
        max_tokens = max(q * sizes[-1] for q, sizes in self.sizes.items())
        self.buffers = DecodeBuffers(max_batch, m.max_model_len, config.cache.block_size, device, max_tokens)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # each graph's output rows, alive for its lifetime
        self.replays = 0
        self._pool, self._stream = None, None  # created at the first capture

    def num_splits(self, size: int) -> int:
        """The decode kernel's split count for a bucket, from max_model_len: fixed for the graph."""
        from kernels.paged_attention_decode import default_num_splits

        return default_num_splits(size, self.num_kv_heads, self.max_model_len, self.device)

    @torch.inference_mode()
    def capture(self, model: nn.Module, kv_caches: list[torch.Tensor]) -> None:
        """Capture every bucket, most tokens first so the smaller graphs reuse its pool memory. The
        buffers hold only padding meanwhile, so neither warmup nor capture writes the cache."""
        start, free_before = time.perf_counter(), _free_bytes(self.device)
        shapes = sorted(((size, q) for q, sizes in self.sizes.items() for size in sizes),
                        key=lambda shape: -shape[0] * shape[1])
        for shape in progress(shapes, "Capturing CUDA graphs (decode and verify)", "graph"):
            self.graphs[shape], self.outputs[shape] = self._capture_one(model, kv_caches, *shape)
        log.info(
            "captured %d CUDA graphs (batch %s, tokens per request %s) in %.1f s, %.2f GiB", len(shapes),
            "/".join(f"{sizes[0]}..{sizes[-1]}" for sizes in self.sizes.values()), list(self.sizes),
            time.perf_counter() - start, (free_before - _free_bytes(self.device)) / 2**30,
        )

    def _capture_one(
        self, model: nn.Module, kv_caches: list[torch.Tensor], size: int, q: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        splits = self.num_splits(size)
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        # Warm up eagerly on the capture stream: Triton compiles and loads this size's kernels and
        # cuBLAS sets up its workspace for the stream; neither may happen while capturing.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self.buffers.forward(model, self.backend, kv_caches, size, splits, q)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            out = self.buffers.forward(model, self.backend, kv_caches, size, splits, q)
        torch.cuda.synchronize(self.device)
        return graph, out

    def bucket(self, attn: CommonAttentionMetadata) -> tuple[int, int] | None:
        """The (bucket, tokens per request) a step replays: steps whose requests have one token
        each, or up to a verify step's q, within the largest bucket; else None."""
        if attn.num_reqs == 0 or max(attn.seq_lens) > self.max_model_len:  # the table width assumes it
            return None
        if attn.num_decodes == attn.num_reqs:
            q = 1
        else:
            longest = max(b - a for a, b in itertools.pairwise(attn.query_start_loc))
            q = next((q for q in self.sizes if q >= longest and q > 1), None)
        if q not in self.sizes:
            return None
        size = bucket_for(self.sizes[q], attn.num_reqs)
        return None if size is None else (size, q)

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Hidden states [T, hidden] of a decode or verify step through its graph; None when the
        step must run eagerly. Valid until the next run()."""
        shape = self.bucket(inputs.attn)
        if shape is None:
            return None
        self.buffers.load(inputs, *shape)
        self.graphs[shape].replay()
        self.replays += 1
        return self.outputs[shape][: len(inputs.input_ids)]


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
