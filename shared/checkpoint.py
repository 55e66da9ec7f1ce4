"""A checkpoint's files: where a model lives (a local folder or a hub id) and what its config.json
and generation_config.json say that ModelConfig (shared/config.py) takes in. Nothing here
imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANTIZATIONS = ("int8",)  # int8: weight-only, per-channel, quantized at load
CHECKPOINT_QUANTIZATIONS = ("compressed-tensors", "gptq", "awq")  # detected from config.json's quantization_config


def checkpoint_quantization(hf: dict[str, Any], requested: str | None) -> str | None:
    """The quantization a model runs with: the checkpoint's (quantization_config.quant_method), or
    the requested one for an unquantized checkpoint."""
    if requested is not None and requested not in QUANTIZATIONS + CHECKPOINT_QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS + CHECKPOINT_QUANTIZATIONS}, got {requested!r}")
    qconfig = hf.get("quantization_config")
    if not qconfig:
        if requested in CHECKPOINT_QUANTIZATIONS:
            raise ValueError(f"quantization {requested} needs a checkpoint quantized so (config.json has no "
                             "quantization_config)")
        return requested
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method not in CHECKPOINT_QUANTIZATIONS:
        raise ValueError(f"the checkpoint is quantized with {method!r}, which is not supported; supported: "
                         f"{CHECKPOINT_QUANTIZATIONS}")
    if requested not in (None, method):
        raise ValueError(f"quantization {requested} was asked for, but the checkpoint is quantized with {method}")
    return method


_CONFIG_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_PT_FILES = ["pytorch_model*.bin"]  # with its index, a *.json


def resolve_model_path(model: str, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id fetched through huggingface_hub
    (with weights=False, only the config, generation config and tokenizer files)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/")):
        raise ValueError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model, revision=revision,
                                      allow_patterns=_CONFIG_FILES + (["*.safetensors"] if weights else [])))
        if weights and not any(path.glob("*.safetensors")):  # PyTorch's format only (some EAGLE heads)
            path = Path(snapshot_download(model, revision=revision, allow_patterns=_CONFIG_FILES + _PT_FILES))
        return path
    except Exception as exc:  # network down, unknown repo, gated model
        raise ValueError(f"could not load model {model!r}: not a local directory and the hub said: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# generation_config.json keys that become request defaults, mapped to SamplingParams names.
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def position_limit(hf: dict[str, Any], architecture: str) -> int:
    """The longest input the position embeddings cover (XLM-RoBERTa's start after the padding id)."""
    limit = hf.get("max_position_embeddings", 2048)
    if architecture.startswith("XLMRoberta"):
        limit -= int(hf.get("pad_token_id", 1)) + 1
    return limit
