"""Pooling models (embeddings, cross-encoder scores): what a checkpoint does and how its hidden
states become one vector per request. Torch-free: the engine and the frontend read it too.

A checkpoint's sentence-transformers files say how it pools (modules.json, 1_Pooling/config.json:
mean, CLS or last token) and whether it normalizes (a Normalize module); without them, encoders
pool the CLS token and decoders the last token, normalized, as vLLM does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from shared.processor.errors import InvalidRequest
from shared.sampling_params import is_int

RUNNERS = ("auto", "generate", "pooling")
TASKS = ("generate", "embed", "classify")  # what a served model does (ModelInfo.task)
POOLING_TYPES = ("MEAN", "CLS", "LAST")
ENCODER_ARCHITECTURES = ("BertModel", "XLMRobertaModel")
CLASSIFIER_ARCHITECTURES = ("BertForSequenceClassification",)

_ST_POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS", "pooling_mode_lasttoken": "LAST"}


class PoolingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One pooling request's options, as the worker applies them.

    dimensions: keep the first `dimensions` values (matryoshka), renormalized when the model
    normalizes. segment_start: for a cross-encoder's (query, document) pair, the first token of
    the document (token type 1 from there on); 0 for a single text."""

    dimensions: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    segment_start: Annotated[int, Meta(ge=0)] = 0

    def __post_init__(self) -> None:  # the bounds above hold on decoding; here for a constructor call too
        if self.dimensions is not None and not (is_int(self.dimensions) and 1 <= self.dimensions <= 1 << 20):
            raise ValueError(f"dimensions must be a positive integer (or None), got {self.dimensions!r}")
        if not (is_int(self.segment_start) and self.segment_start >= 0):
            raise ValueError(f"segment_start must be a non-negative integer, got {self.segment_start!r}")


@dataclass(frozen=True)
class PoolerConfig:
    task: str  # "embed" or "classify"
    pooling_type: str  # one of POOLING_TYPES
    normalize: bool
    max_seq_length: int | None = None  # sentence_bert_config.json: the longest input it was trained on


def is_encoder_architecture(architecture: str) -> bool:
    """Bidirectional encoders: no causal mask, nothing kept in the KV cache after the forward."""
    return architecture in ENCODER_ARCHITECTURES + CLASSIFIER_ARCHITECTURES


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _sentence_transformers(path: Path) -> tuple[str | None, bool, int | None]:
    """(pooling type, normalize, max_seq_length) from the sentence-transformers files, if any."""
    modules = _read(path / "modules.json") or []
    pooling, normalize = None, False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            conf = _read(path / str(module.get("path", "")) / "config.json") or {}
            modes = [ours for key, ours in _ST_POOLING.items() if conf.get(key)]
            others = [k for k, v in conf.items() if k.startswith("pooling_mode") and v and k not in _ST_POOLING]
            if others or len(modes) != 1:
                raise ValueError(f"{path}: unsupported sentence-transformers pooling {conf}; supported: "
                                 "exactly one of mean, CLS or last token")
            pooling = modes[0]
    st = _read(path / "sentence_bert_config.json") or {}
    max_len = st.get("max_seq_length") if isinstance(st.get("max_seq_length"), int) else None
    return pooling, normalize, max_len


def resolve_pooler(path: str | Path, architecture: str, runner: str) -> PoolerConfig | None:
    """How the checkpoint at path pools, or None when it generates text. runner "auto" pools the
    encoder architectures and generates with the others; "pooling" makes a decoder an embedding
    model (last-token pooling unless its sentence-transformers files say otherwise)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    encoder = is_encoder_architecture(architecture)
    if runner == "generate" and encoder:
        raise ValueError(f"{architecture} is an encoder: it cannot generate text; use runner='pooling'")
    if runner == "generate" or (runner == "auto" and not encoder):
        return None
    if architecture in CLASSIFIER_ARCHITECTURES:
        return PoolerConfig("classify", "CLS", False)
    pooling, normalize, max_len = _sentence_transformers(Path(path))
    if pooling is None:  # no sentence-transformers files: vLLM's defaults
        pooling, normalize = ("CLS" if encoder else "LAST"), True
    return PoolerConfig("embed", pooling, normalize, max_len)


def check_pooling(config: Any, num_tokens: int, pooling: PoolingParams | None) -> None:
    """A request fits the model's task and the engine's limits (config: an EngineConfig);
    ValueError otherwise."""
    model = config.model
    if pooling is None:
        if model.pooler is not None:
            raise ValueError(f"this model is a pooling model ({model.pooler.task}): it does not generate text")
        return
    if model.pooler is None:
        raise ValueError("this model generates text: it does not pool (serve an embedding model for embeddings)")
    if pooling.dimensions is not None:
        if model.pooler.task != "embed":
            raise ValueError("dimensions applies to embeddings only")
        if pooling.dimensions > model.hidden_size:
            raise InvalidRequest(f"dimensions must be at most this model's embedding size, {model.hidden_size}; "
                                 f"got {pooling.dimensions}", "dimensions")
    budget = config.scheduler.max_num_batched_tokens
    if num_tokens > budget:
        raise ValueError(f"input is {num_tokens} tokens long; a pooling model computes each input in one step, "
                         f"of at most max_num_batched_tokens={budget} tokens")
