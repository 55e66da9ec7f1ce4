"""A PEFT LoRA adapter read into host memory, mapped onto the model's (fused) layers.

Tensors stay full (unsharded) here; each rank copies its share into its device slots
(layer.py), so the host copy serves any slot and any tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from shared.lora import WEIGHTS_FILE, check_adapter

# A module's parts: (shard id in the fused layer, A [r, in], B * scaling [out, r]).
Parts = list[tuple[object, torch.Tensor, torch.Tensor]]


@dataclass
class LoRAAdapter:
    rank: int
    layers: dict[str, Parts]  # our module name ("model.layers.0.self_attn.qkv_proj") -> parts


def load_adapter(path: str, hf_config: dict, max_lora_rank: int, packed: dict[str, tuple[str, object]],
                 dtype: torch.dtype) -> LoRAAdapter:
    """Check and read an adapter folder (ValueError when it is bad: too high a rank, modules the
    model lacks, a corrupt file). packed: the model's packed_modules_mapping."""
    info = check_adapter(path, hf_config, max_lora_rank)
    layers: dict[str, Parts] = {}
    try:
        with safe_open(str(info.path / WEIGHTS_FILE), framework="pt") as f:
            for module in info.modules:
                prefix, leaf = module.rsplit(".", 1)
                ours, shard = packed.get(leaf, (leaf, None))
                a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").to(dtype)
                b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").float() * info.scaling
                layers.setdefault(f"{prefix}.{ours}", []).append((shard, a, b.to(dtype)))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 (safetensors' own errors on a damaged file)
        raise ValueError(f"adapter {info.path}: {WEIGHTS_FILE} could not be read ({exc})") from None
    for parts in layers.values():
        for _, a, b in parts:
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"adapter {info.path}: weights hold NaN or infinite values")
    return LoRAAdapter(info.rank, layers)
