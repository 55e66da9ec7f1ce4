"""LoRA adapters without torch: the request that names one, and the checks of a PEFT adapter
folder (adapter_config.json + adapter_model.safetensors) against a model.

The checks read only the adapter's config and the safetensors header, so the frontend can
answer a bad adapter with a 400 before any worker loads it; the worker runs the same checks
before it reads the tensors.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

# The projections an adapter may target (the attention and MLP projections of Llama-family models).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100 << 20
_KEY = re.compile(r"^base_model\.model\.(.+)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                  r"\.lora_([AB])\.weight$")


class LoRARequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An adapter a request runs with (vLLM's LoRARequest(lora_name, lora_int_id, lora_path)).
    The whole value identifies the adapter: in the worker's adapter cache and in the prefix
    cache's block hashes, so two adapters never share KV."""

    lora_name: Annotated[str, Meta(min_length=1, max_length=256)]
    lora_int_id: Annotated[int, Meta(ge=1, le=2**31 - 1)]
    lora_path: Annotated[str, Meta(min_length=1, max_length=4096)]

    def hash_seed(self) -> bytes:
        """What the first KV block's hash is chained to (the base model chains to nothing)."""
        return msgspec.msgpack.encode(self)


@dataclass(frozen=True)
class AdapterInfo:
    """What a checked adapter folder holds: its rank, scale and per-module tensor shapes."""

    path: Path
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora), folded into B when loaded
    # "model.layers.0.self_attn.q_proj" -> (A shape [r, in], B shape [out, r])
    modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def expected_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) features of each projection an adapter may target, from the model's config."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    kv = (hf_config.get("num_key_value_heads") or heads) * head_dim
    inter = hf_config.get("intermediate_size", 0)
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def check_adapter(path: str | Path, hf_config: dict[str, Any], max_lora_rank: int) -> AdapterInfo:
    """Read and check a PEFT LoRA adapter folder against a model; ValueError says what is wrong."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter {folder}: r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise ValueError(f"adapter {folder} has rank {rank}, above this server's max_lora_rank {max_lora_rank}")
    _check_unsupported(folder, config)
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    lacking = sorted({n.rsplit(".", 1)[-1] for n in names} - set(LORA_MODULES)) if isinstance(targets, list) else []
    if lacking:
        raise ValueError(f"adapter {folder} targets modules this model has no LoRA support for: {lacking}; "
                         f"supported: {list(LORA_MODULES)}")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"adapter {folder}: lora_alpha must be a number, got {alpha!r}")  # noqa: TRY004
    scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    modules = _check_tensors(folder, _read_header(folder / WEIGHTS_FILE), rank, hf_config)
    return AdapterInfo(folder, rank, float(scaling), modules)


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"adapter {folder}: no {CONFIG_FILE} (is it a PEFT LoRA adapter folder?)")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter {folder}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"adapter {folder}: {CONFIG_FILE} must hold a JSON object")  # noqa: TRY004
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {folder} is a {config.get('peft_type')!r} adapter; only LORA is supported")
    return config


def _check_unsupported(folder: Path, config: dict[str, Any]) -> None:
    for key, what in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                      ("modules_to_save", "modules_to_save"), ("use_dora", "DoRA")):
        if config.get(key):
            raise ValueError(f"adapter {folder} uses {what} ({key}), which is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {folder} trains biases (bias={config.get('bias')!r}); only 'none' is supported")


def _read_header(file: Path) -> dict[str, Any]:
    """The safetensors header (tensor names, dtypes, shapes, offsets), checked against the file size."""
    if not file.is_file():
        raise ValueError(f"adapter {file.parent}: no {WEIGHTS_FILE}")
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")  # noqa: TRY004 (reported as a corrupt file)
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end}, the file has {size}")
    except (ValueError, struct.error, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter {file.parent}: {WEIGHTS_FILE} is corrupt or not safetensors ({exc})") from None
    return header


def _check_tensors(folder: Path, header: dict[str, Any], rank: int, hf_config: dict[str, Any]):
    shapes = expected_shapes(hf_config)
    num_layers = hf_config["num_hidden_layers"]
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, meta in header.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"adapter {folder}: tensor {key!r} is not a LoRA A/B weight of a supported module")
        prefix, proj, ab = match.groups()
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)", prefix)
        in_attn = proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        if layer is None or int(layer.group(1)) >= num_layers or (layer.group(2) == "self_attn") != in_attn:
            raise ValueError(f"adapter {folder}: tensor {key!r} names a module this model lacks")
        out_f, in_f = shapes[proj]
        want = (rank, in_f) if ab == "A" else (out_f, rank)
        if tuple(meta.get("shape", ())) != want:
            raise ValueError(f"adapter {folder}: {key} has shape {meta.get('shape')}, this model needs {list(want)}")
        found.setdefault(f"{prefix}.{proj}", {})[ab] = want
    if not found:
        raise ValueError(f"adapter {folder}: {WEIGHTS_FILE} holds no LoRA weights")
    halves = [m for m, ab in found.items() if len(ab) != 2]
    if halves:
        raise ValueError(f"adapter {folder}: modules with only one of lora_A and lora_B: {halves[:3]}")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


def parse_lora_modules(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """vLLM's --lora-modules: `name=path` words, or JSON objects {"name": ..., "path": ...}."""
    modules: dict[str, str] = {}
    for value in values or ():
        if value.lstrip().startswith("{"):
            try:
                item = json.loads(value)
                name, path = item["name"], item["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--lora-modules: {value!r} is not a JSON object with name and path ({exc})") from None
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules takes name=path (or a JSON object), got {value!r}")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ValueError(f"--lora-modules: {value!r} needs a non-empty name and path")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return tuple(modules.items())
