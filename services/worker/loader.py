"""Build a model and stream its checkpoint's weights into it: safetensors, or where a checkpoint
has none, PyTorch's pytorch_model*.bin (read with torch.load(weights_only=True): tensors only, no
code runs).

Checkpoint names map to parameters by name: through the model's renamed_modules (Mixtral's
block_sparse_moe -> mlp), its packed_modules_mapping for fused projections (q_proj -> qkv_proj
shard "q") and its expert_mapping for stacked MoE experts (experts.3.gate_proj ->
experts.w13_weight shard (3, 0)); each parameter's weight_loader slices the full tensor for this
tensor-parallel rank. A missing or unexpected weight is an error, not a silent default.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from services.worker import huge_pages
from services.worker.layers.linear import default_weight_loader
from services.worker.models import get_model_class
from services.worker.pipeline import on_another_stage
from services.worker.quant import methods as quant
from services.worker.quant.kv_scales import load_kv_scale
from services.worker.stats_log import shard_progress
from shared.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(model_config: ModelConfig, device: torch.device | str) -> torch.dtype:
    """The compute dtype: ModelConfig.dtype None means float32 on CPU and the checkpoint's dtype
    elsewhere; "auto" means the checkpoint's; any other value names the dtype."""
    name = model_config.dtype
    if name is None:
        name = "float32" if torch.device(device).type == "cpu" else model_config.checkpoint_dtype
    elif name == "auto":
        name = model_config.checkpoint_dtype
    name = name.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def native_cpu_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs this dtype's GEMMs natively here (bf16: AVX512-BF16 or AMX; fp16:
    AVX512-FP16 or AMX-FP16); torch then takes that path by itself for every linear layer."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def build_model(model_config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Construct the model for model_config.architecture directly in dtype on device, load its
    weights from model_config.path and return it in eval mode."""
    cls = get_model_class(model_config.architecture)
    if torch.device(device).type == "cpu" and not native_cpu_dtype(dtype):
        log.warning("%s has no native support on this CPU (%s): its GEMMs are emulated, slower than float32",
                    dtype, torch.backends.cpu.get_cpu_capability())
    with building(dtype, device):
        model = cls(model_config)
    quant.before_loading(model, model_config, torch.device(device))
    huge_pages.move_weights(model)
    load_weights(model, model_config.path)
    quant.after_loading(model, model_config)
    return model.requires_grad_(False).eval()


@contextmanager
def building(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Modules constructed inside get their parameters created empty in dtype on device, in
    place, with no cast afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# (index, single file, shard pattern) of each weight format, in order of preference
_FORMATS = (
    ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: its safetensors (the index's shards, the single
    file, or every *.safetensors), else its pytorch_model*.bin the same way."""
    path = Path(path)
    for index_name, single, pattern in _FORMATS:
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index} is not a weights index (a weight_map of file names): {exc!r}") from None
            if any(not isinstance(s, str) or Path(s).name != s for s in shards):
                raise ValueError(f"{index} names shards outside the checkpoint directory")
            return [path / shard for shard in shards]
        if (path / single).is_file():
            return [path / single]
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no safetensors or pytorch_model.bin weights in {path}")


def _read_pt(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model*.bin's tensors by name; ValueError for a file that is not one, or that
    would need to run code to load."""
    try:
        # mapped, not read, where the file is torch's zip format (since torch 1.6); read otherwise
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # noqa: BLE001 (pickle, zip and torch errors alike: the file is unusable)
        raise ValueError(f"{file} is not a PyTorch weights file that loads without running code: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{file} does not hold a dict of named tensors")
    return state


def _shard_tensors(file: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Each tensor's name in a weight file, with what reads it (safetensors: only when called)."""
    if file.suffix == ".bin":
        for name, tensor in _read_pt(file).items():
            yield name, functools.partial(lambda t: t, tensor)
        return
    with safe_open(str(file), framework="pt", device="cpu") as f:
        names = f.keys()
        for name in names:
            yield name, functools.partial(f.get_tensor, name)


def checkpoint_tensor_names(path: str | Path) -> set[str]:
    """The names of every tensor in the checkpoint at path."""
    return {name for file in checkpoint_files(path) for name, _ in _shard_tensors(file)}


def checkpoint_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of the checkpoint at path; ValueError when it has none of that name."""
    for file in checkpoint_files(path):
        for found, read in _shard_tensors(file):
            if found == name:
                return read()
    raise ValueError(f"checkpoint {path} has no {name}")


def _iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in shard_progress(checkpoint_files(path)):
        for name, read in _shard_tensors(file):
            yield name, read()


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.weight$")


def _target(name: str, model: nn.Module) -> tuple[str, object]:
    """A checkpoint name -> (parameter name, shard id): q_proj -> (qkv_proj, "q")."""
    renames = getattr(model, "renamed_modules", {})
    parts = [renames.get(part, part) for part in name.split(".")]
    expert = _EXPERT.match(".".join(parts))
    experts = getattr(model, "expert_mapping", {})
    if expert is not None and expert.group(3) in experts:
        param, part = experts[expert.group(3)]
        return f"{expert.group(1)}.{param}", (int(expert.group(2)), part)
    mapping = getattr(model, "packed_modules_mapping", {})
    for i, part in enumerate(parts):
        if part in mapping:
            parts[i], shard_id = mapping[part]
            return ".".join(parts), shard_id
    return ".".join(parts), None


def _required_shards(params: dict[str, nn.Parameter], mapping: dict[str, tuple[str, object]]) -> dict:
    packed: dict[str, set] = {}
    for fused, shard_id in mapping.values():
        packed.setdefault(fused, set()).add(shard_id)
    required = {}
    for name, param in params.items():
        fused = next((part for part in name.split(".") if part in packed), None)
        required[name] = getattr(param, "required_shards", None) or (packed[fused] if fused else {None})
    return required


def _unused(name: str, model: nn.Module) -> bool:
    """A decoder run as an embedding model never computes logits: its checkpoint (e.g.
    Qwen3-Embedding's) may have no LM head."""
    config = getattr(model, "config", None)
    return name.startswith("lm_head.") and getattr(config, "pooler", None) is not None


def _skipped(name: str, model: nn.Module) -> bool:
    if "rotary_emb." in name or name.endswith("embeddings.position_ids"):  # buffers some checkpoints carry
        return True
    if getattr(model, "skip_checkpoint_tensor", None) and model.skip_checkpoint_tensor(name):  # quantization's
        return True
    return name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Stream every tensor of the checkpoint at path into model's parameters."""
    mapping = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {}
    unexpected = []
    for name, tensor in _iter_weights(path):
        if _skipped(name, model) or load_kv_scale(model, name, tensor):
            continue
        target, shard_id = _target(name, model)
        if target not in params and f"model.{target}" in params:  # e.g. OPT's "decoder.*" names
            target = f"model.{target}"
        if target not in params and on_another_stage(model, target):
            target = getattr(model, "stage_aliases", {}).get(target)
            if target is None:  # another pipeline stage loads it
                continue
        if target not in params:
            unexpected.append(name)
            continue
        param = params[target]
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            weight_loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"cannot load checkpoint weight {name!r} into {target!r}: {exc}") from exc
        loaded.setdefault(target, set()).add(shard_id)
    if unexpected:
        raise ValueError(f"checkpoint {path} has weights the model does not: {', '.join(unexpected[:10])}")
    missing = [
        name if shards == {None} else f"{name} (shards {sorted(map(str, shards - loaded.get(name, set())))})"
        for name, shards in _required_shards(params, mapping).items()
        if not shards <= loaded.get(name, set()) and not _unused(name, model)
    ]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights the model needs: {', '.join(missing[:10])}")
