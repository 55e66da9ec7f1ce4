"""One frozen configuration tree, built once at the entry point and passed down.

Values learned at run time (the number of KV blocks the workers measured) travel in messages
and constructor arguments, never by mutating these objects. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shared.checkpoint import (
    GENERATION_DEFAULTS,
    checkpoint_quantization,
    position_limit,
    read_json,
    resolve_model_path,
)
from shared.config_checks import check_bool, check_bool_fields
from shared.draft_model import draft_model_config
from shared.pooling import PoolerConfig, resolve_pooler
from shared.speculative import SpeculativeConfig

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("torch", "triton")  # PAGEDSERVE_ATTENTION_BACKEND
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # auto: the model's dtype; fp8 is fp8_e4m3
@dataclass(frozen=True)
class ModelConfig:
    """The Hugging Face config normalized once into the fields the engine and worker use."""

    path: str
    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: str | None  # None: float32 on CPU, the checkpoint's dtype on GPU
    checkpoint_dtype: str
    eos_token_ids: tuple[int, ...]
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    quantization: str | None = None  # QUANTIZATIONS; None: the checkpoint's weights as they are
    pooler: PoolerConfig | None = None  # a pooling model (embeddings, scores); None: it generates

    @property
    def task(self) -> str:
        """What the model does: "generate", "embed" or "classify" (shared.pooling.TASKS)."""
        return "generate" if self.pooler is None else self.pooler.task

    @property
    def class_labels(self) -> list[str]:
        """A sequence classifier's label names in class order: config.json's id2label (its keys
        are the class indices, as strings), else transformers' LABEL_i for its two default classes."""
        hf = self.hf_config
        id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
        count = int(hf.get("num_labels") or len(id2label) or 2)
        return [id2label.get(i, f"LABEL_{i}") for i in range(count)]

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype: str | None = None,
        max_model_len: int | None = None,
        served_name: str | None = None,
        revision: str | None = None,
        weights: bool = True,
        quantization: str | None = None,
        runner: str = "auto",
    ) -> ModelConfig:
        """weights=False fetches no weight files for a hub id (the engine needs only the config).
        runner: "generate", "pooling", or "auto" (encoders pool, decoders generate)."""
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        path = resolve_model_path(model, revision, weights)
        hf = read_json(path / "config.json")
        if not hf:
            raise ValueError(f"{path} has no config.json")
        gen = read_json(path / "generation_config.json")
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}/config.json names no architecture")
        if hf.get("model_type") == "opt":
            hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
            kv_heads, layers = heads, hf["num_hidden_layers"]
        else:
            hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
            kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        pooler = resolve_pooler(path, archs[0], runner)
        limit = position_limit(hf, archs[0])
        if max_model_len is None:
            max_model_len = min(limit, pooler.max_seq_length or limit) if pooler else limit
        elif max_model_len <= 0 or max_model_len > limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] for this model, got {max_model_len}")
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        defaults = {ours: gen[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if gen.get(theirs) is not None}
        return cls(
            path=str(path),
            name=served_name or model,
            architecture=archs[0],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=hf["vocab_size"],
            max_model_len=max_model_len,
            dtype=None if dtype is None else dtype,
            checkpoint_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            eos_token_ids=eos_ids,
            generation_defaults=defaults,
            hf_config=hf,
            quantization=checkpoint_quantization(hf, quantization),
            pooler=pooler,
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int = 2 << 30  # bytes of KV cache on CPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # tests: force a tiny pool
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ValueError(f"block_size must be a power of two up to 256, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be at least 1")


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    """policy: "fcfs" admits in arrival order and preempts the newest request; "priority" admits
    by (priority, arrival) and preempts the largest (priority, arrival) first. The queue limits
    bound what the service admits into the waiting queue (past them it answers 503).
    async_scheduling: plan each step while the workers compute the previous one (the workers feed
    their sampled tokens forward; finishes are reconciled one step late)."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"
    max_num_queued_requests: int = 1024
    max_queued_tokens: int = 1 << 20
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.max_num_queued_requests < 1 or self.max_queued_tokens < 1:
            raise ValueError("max_num_queued_requests and max_queued_tokens must be at least 1")


@dataclass(frozen=True)
class ParallelConfig:
    """A replica's ranks: pipeline stage s holds ranks s*T .. s*T+T-1 (T: tensor-parallel size);
    ``rank`` is this worker's among all of them."""

    tensor_parallel_size: int = 1
    rank: int = 0
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the replica's {self.world_size} rank(s)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def result_rank(self) -> int:
        """The rank that answers the engine: the last stage's first tensor-parallel rank."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


@dataclass(frozen=True)
class CompilationConfig:
    """How the worker executes steps on a GPU. By default decode-only steps of up to
    max_capture_size requests replay CUDA graphs captured at startup; enforce_eager runs every
    step eagerly (no capture). Ignored on CPU."""

    enforce_eager: bool = False
    max_capture_size: int = 256  # largest decode batch captured; bigger ones run eagerly
    # the worker's kernel set; None: triton on CUDA, torch on CPU
    attention_backend: str | None = field(default_factory=lambda: os.environ.get("PAGEDSERVE_ATTENTION_BACKEND") or None)

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.max_capture_size < 1:
            raise ValueError("max_capture_size must be at least 1")
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's names): adapters up to max_lora_rank; at most max_loras different
    adapters in one batch (the worker's device slots); max_cpu_loras adapters kept loaded in host
    memory (None: max_loras)."""

    max_lora_rank: int = 16
    max_loras: int = 1
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.max_lora_rank < 1 or self.max_loras < 1:
            raise ValueError("max_lora_rank and max_loras must be at least 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")

    @classmethod
    def if_enabled(cls, enable_lora: bool, *args: int | None) -> LoRAConfig | None:
        """LoRAConfig(*args) with vLLM's enable_lora on, else None (LoRA adapters refused)."""
        check_bool("enable_lora", enable_lora)
        return cls(*args) if enable_lora else None

    @property
    def cpu_capacity(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    seed: int = 0
    speculative: SpeculativeConfig | None = None  # --speculative-config
    lora: LoRAConfig | None = None  # None: LoRA adapters are refused

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.parallel.pipeline_parallel_size > self.model.num_layers:
            raise ValueError(f"pipeline_parallel_size {self.parallel.pipeline_parallel_size} exceeds the model's "
                             f"{self.model.num_layers} layers (each stage needs at least one)")
        if self.parallel.pipeline_parallel_size > 1 and (self.cache.kv_cache_dtype != "auto" or self.model.pooler):
            raise ValueError("--pipeline-parallel-size > 1 does not combine with an fp8 --kv-cache-dtype or a "
                             "pooling model yet")
        draft_model_config(self, weights=False)  # a draft model that cannot serve this target fails here
