"""Worker metrics: forward and sampling time per step, batch shape, KV blocks, memory, and the
requests the worker failed alone (bad input, a grammar that fails, nothing left to sample)."""

from __future__ import annotations

import resource

import torch
from prometheus_client import Counter, Gauge, Histogram

from services.worker.model_runner import ModelRunner, StepStats
from shared.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS


class WorkerMetrics:
    def __init__(self, model_name: str, rank: int, runner: ModelRunner):
        labels = {"model_name": model_name, "rank": str(rank)}
        names = list(labels)
        self.runner = runner
        self.forward = Histogram(
            "pagedserve_worker_forward_seconds", "Model forward time per step.", names + ["phase"],
            buckets=LATENCY_BUCKETS,
        )
        self.labels = labels
        self.batch = Histogram(
            "pagedserve_worker_batch_size", "Requests per step.", names, buckets=TOKEN_BUCKETS
        ).labels(**labels)
        self.tokens = Histogram(
            "pagedserve_worker_tokens_per_step", "Tokens computed per step.", names, buckets=TOKEN_BUCKETS
        ).labels(**labels)
        self.sampling = Histogram(
            "pagedserve_worker_sampling_seconds", "Sampling time per step.", names, buckets=LATENCY_BUCKETS
        ).labels(**labels)
        Gauge("pagedserve_worker_kv_blocks", "KV cache blocks allocated on this rank.", names).labels(
            **labels
        ).set(runner.num_blocks)
        self.busy = Counter(
            "pagedserve_worker_busy_seconds", "Seconds spent computing steps (not waiting for plans or activations).",
            names,
        ).labels(**labels)
        self.failed = Counter(
            "pagedserve_worker_failed_requests", "Requests the worker failed alone, the rest of their step served.",
            names,
        ).labels(**labels)
        if runner.lora is not None:  # read from the adapter manager at each scrape
            loads = Gauge("pagedserve_worker_lora_adapter_loads", "LoRA adapters read from disk into host memory "
                          "(a count since start: an adapter evicted from --max-cpu-loras and used again is read again).",
                          names)
            loads.labels(**labels).set_function(lambda: runner.lora.num_loads)
            slots = Gauge("pagedserve_worker_lora_adapters_active", "LoRA adapters in this rank's device slots.", names)
            slots.labels(**labels).set_function(lambda: len(runner.lora.slots))
        memory = Gauge("pagedserve_worker_memory_used_bytes", "Device memory in use (CPU: peak RSS).", names)
        memory.labels(**labels).set_function(self._memory_used)

    def _memory_used(self) -> float:
        if self.runner.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.runner.device))
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def observe(self, stats: StepStats | None, num_failed: int = 0, busy_s: float = 0.0) -> None:
        self.failed.inc(num_failed)
        self.busy.inc(max(busy_s, 0.0))
        if stats is None:
            return
        self.forward.labels(**self.labels, phase=stats.phase).observe(stats.forward_s)
        self.batch.observe(stats.num_reqs)
        self.tokens.observe(stats.num_tokens)
        self.sampling.observe(stats.sampling_s)
