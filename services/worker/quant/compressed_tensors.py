"""Pre-quantized compressed-tensors checkpoints (llm-compressor's format): int8 and FP8 weights.

config.json's quantization_config names quant_method "compressed-tensors", a format (one 8-bit
tensor per weight: "int-quantized" / "naive-quantized" for int8, "float-quantized" for
float8_e4m3fn) and config_groups whose "weights" give num_bits 8, symmetric, and the strategy of
weight_scale: "channel" (weight_scale [N, 1]) or, for FP8, "tensor" (one scale per checkpoint
tensor, so a fused q/k/v layer has one per part). W = weight * weight_scale (the format's
dequantization). int8 weights load straight into the int8 layers of services/worker/quant/int8.py
(decode runs the kernels of quantization="int8"); FP8 weights are dequantized once at load into
the model's dtype (no FP8 matmul kernel here: no weight memory saved).

input_activations quantized dynamically per token (W8A8: llm-compressor's W8A8 int8 and
FP8_DYNAMIC schemes) are emulated (services/worker/quant/activation_quant.py); static activation
scales (input_scale) are skipped and those layers compute as W8A16. Other schemes fail at startup
naming what the checkpoint asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.layers.linear import RowParallelLinear, _Linear, default_weight_loader
from services.worker.quant.activation_quant import PerTokenActivationQuant
from services.worker.quant.int8 import Int8Weights

FORMATS = {"int-quantized": "int", "naive-quantized": "int", "float-quantized": "float"}
WEIGHT_DTYPES = {"int": torch.int8, "float": torch.float8_e4m3fn}
WEIGHT_SCHEMES = ((8, "int", "channel", True), (8, "float", "channel", True), (8, "float", "tensor", True))
_SKIPPED = ("input_scale", "input_zero_point", "weight_zero_point")  # static activation scales; symmetric zeros


@dataclass(frozen=True)
class Scheme:
    weights: str  # "int" (int8) or "float" (fp8 e4m3)
    activations: str | None  # dynamic per-token activation quantization ("int" / "float"), or None


def _activations(name: str, config: dict[str, Any] | None, weights: str) -> str | None:
    if not config or not config.get("dynamic", False):
        return None  # weight-only, or static scales computed as W8A16
    scheme = (config.get("num_bits"), config.get("type"), config.get("strategy"), config.get("symmetric", True))
    if scheme != (8, weights, "token", True):
        raise ValueError(f"compressed-tensors group {name!r}: dynamic input_activations {scheme} (num_bits, type, "
                         f"strategy, symmetric) are not supported; supported: (8, {weights!r}, 'token', True)")
    return weights


def check_config(config: dict[str, Any]) -> Scheme:
    """The scheme of a compressed-tensors config; refuse, naming it, one pagedserve does not run."""
    fmt = config.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: {tuple(FORMATS)}")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        w = group.get("weights") or {}
        scheme = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("symmetric", True))
        if scheme not in WEIGHT_SCHEMES or scheme[1] != FORMATS[fmt]:
            raise ValueError(f"compressed-tensors group {name!r}: weights {scheme} (num_bits, type, strategy, "
                             f"symmetric) are not supported in format {fmt!r}; supported: {WEIGHT_SCHEMES}")
        if "Linear" not in (group.get("targets") or []):
            raise ValueError(f"compressed-tensors group {name!r} must target Linear layers, got {group.get('targets')}")
        schemes.add(Scheme(scheme[1], _activations(name, group.get("input_activations"), scheme[1])))
    if len(schemes) > 1:
        raise ValueError(f"compressed-tensors config groups with different schemes are not supported: {schemes}")
    ignored = [name for name in config.get("ignore") or [] if name != "lm_head"]
    if ignored:
        raise ValueError(f"compressed-tensors ignore entries {ignored[:5]} are not supported (only lm_head)")
    return schemes.pop()


def _scale_loader(layer: _Linear, loader):
    """weight_scale [rows, 1] of one checkpoint tensor; a per-tensor scale covers all its rows."""
    def load(param: torch.Tensor, scale: torch.Tensor, shard_id: object = None) -> None:
        if scale.numel() == 1:
            scale = scale.reshape(1, 1).expand(layer.output_shard(shard_id)[3], 1)
        loader(param, scale, shard_id)
    return load


def _weight_loader(layer: _Linear, dtype: torch.dtype):
    def load(param: torch.Tensor, weight: torch.Tensor, shard_id: object = None) -> None:
        if weight.dtype != dtype:
            raise ValueError(f"compressed-tensors weight has dtype {weight.dtype}; this scheme stores {dtype}")
        layer.weight_loader(param, weight, shard_id)
    return load


def prepare_layers(model: nn.Module, scheme: Scheme) -> None:
    """Give every linear layer an 8-bit weight and a weight_scale [N, 1] parameter to load into."""
    dtype = WEIGHT_DTYPES[scheme.weights]
    for layer in model.modules():
        if not isinstance(layer, _Linear):
            continue
        n, k = layer.weight.shape
        # output rows split like the weight's; a row-parallel layer's rows are all on every rank
        loader = default_weight_loader if isinstance(layer, RowParallelLinear) else layer.weight_loader
        device, layer.compute_dtype = layer.weight.device, layer.weight.dtype
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=dtype, device=device), requires_grad=False)
        layer.weight.weight_loader = _weight_loader(layer, dtype)
        layer.weight_scale = nn.Parameter(torch.empty(n, 1, dtype=torch.float32, device=device), requires_grad=False)
        layer.weight_scale.weight_loader = _scale_loader(layer, loader)


def skipped(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _SKIPPED


def finish_layers(model: nn.Module, scheme: Scheme) -> None:
    """After loading: int8 multiplies through the int8 kernels, FP8 is dequantized once; dynamic
    activation quantization wraps either."""
    for layer in model.modules():
        if not isinstance(layer, _Linear):
            continue
        if scheme.weights == "int":
            layer.quant = Int8Weights(layer.weight.data, layer.weight_scale.data.view(-1))
        else:
            weight = (layer.weight.data.float() * layer.weight_scale.data).to(layer.compute_dtype)
            del layer.weight, layer.weight_scale
            layer.weight = nn.Parameter(weight, requires_grad=False)
        if scheme.activations is not None:
            matmul = layer.quant or (lambda x, bias, layer=layer: F.linear(x, layer.weight, bias))
            layer.quant = PerTokenActivationQuant(matmul, scheme.activations)
