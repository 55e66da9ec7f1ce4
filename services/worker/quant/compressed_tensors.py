"""Pre-quantized compressed-tensors checkpoints (llm-compressor's format), int8 weights.

config.json's quantization_config names quant_method "compressed-tensors", a format
("int-quantized" or "naive-quantized": one int8 tensor per weight) and config_groups whose
"weights" give num_bits 8, type "int", symmetric, strategy "channel": each Linear's checkpoint has
weight int8 [N, K] and weight_scale [N, 1], and W = weight * weight_scale (the format's
dequantization). Those load straight into the int8 layers of services/worker/quant/int8.py, so
decode runs the same kernels as quantization="int8". input_activations (W8A8) are accepted and
computed as W8A16: activations stay in the model's dtype. Other schemes fail at startup naming
what the checkpoint asks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from services.worker.layers.linear import RowParallelLinear, _Linear, default_weight_loader
from services.worker.quant.int8 import Int8Weights

FORMATS = ("int-quantized", "naive-quantized")
_SKIPPED = ("input_scale", "input_zero_point", "weight_zero_point")  # W8A8's activation scales; symmetric zeros


def check_config(config: dict[str, Any]) -> None:
    """Refuse, naming it, a compressed-tensors scheme pagedserve does not run."""
    fmt = config.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: {FORMATS} (int8 weights)")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        w = group.get("weights") or {}
        scheme = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("symmetric", True))
        if scheme != (8, "int", "channel", True):
            raise ValueError(f"compressed-tensors group {name!r}: weights {scheme} (num_bits, type, strategy, "
                             "symmetric) are not supported; supported: (8, 'int', 'channel', True)")
        if "Linear" not in (group.get("targets") or []):
            raise ValueError(f"compressed-tensors group {name!r} must target Linear layers, got {group.get('targets')}")
    ignored = [name for name in config.get("ignore") or [] if name != "lm_head"]
    if ignored:
        raise ValueError(f"compressed-tensors ignore entries {ignored[:5]} are not supported (only lm_head)")


def prepare_layers(model: nn.Module) -> None:
    """Give every linear layer an int8 weight and a weight_scale [N, 1] parameter to load into."""
    for layer in model.modules():
        if not isinstance(layer, _Linear):
            continue
        n, k = layer.weight.shape
        # output rows split like the weight's; a row-parallel layer's rows are all on every rank
        loader = default_weight_loader if isinstance(layer, RowParallelLinear) else layer.weight_loader
        device = layer.weight.device
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=torch.int8, device=device), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader
        layer.weight_scale = nn.Parameter(torch.empty(n, 1, dtype=torch.float32, device=device), requires_grad=False)
        layer.weight_scale.weight_loader = loader


def skipped(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _SKIPPED


def finish_layers(model: nn.Module) -> None:
    """After loading: multiply through the int8 kernels."""
    for layer in model.modules():
        if isinstance(layer, _Linear):
            layer.quant = Int8Weights(layer.weight.data, layer.weight_scale.data.view(-1))
