"""Which quantization a model runs with, and applying it once its weights are loaded."""

from __future__ import annotations

import logging

import torch
from torch import nn

from services.worker.layers.linear import _Linear
from services.worker.layers.moe import FusedMoE
from services.worker.quant import awq, compressed_tensors, gptq, int8, packed_int
from shared.config import ModelConfig

log = logging.getLogger(__name__)

PACKED = {"gptq": gptq.packed_format, "awq": awq.packed_format}  # grouped 4/8-bit checkpoints


def check_quantization(method: str | None, device: torch.device) -> None:
    """Fail at startup, naming the scheme and the device, where no kernel runs it."""
    kernel = method in ("int8", "compressed-tensors", *PACKED)
    if kernel and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        raise ValueError(f"quantization {method} needs a GPU of compute capability 7.5 or later for its Triton "
                         f"kernel; {torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")


def before_loading(model: nn.Module, config: ModelConfig, device: torch.device) -> None:
    """Shape the layers for a pre-quantized checkpoint's tensors before they are loaded."""
    check_quantization(config.quantization, device)
    if config.quantization and any(isinstance(m, FusedMoE) for m in model.modules()):
        raise ValueError(f"quantization {config.quantization} of MoE experts ({config.architecture}) is not "
                         f"supported on {device.type}: no quantized expert kernel")
    if config.quantization == "compressed-tensors":
        scheme = compressed_tensors.check_config(config.hf_config["quantization_config"])
        compressed_tensors.prepare_layers(model, scheme)
        model.skip_checkpoint_tensor = compressed_tensors.skipped
    elif config.quantization in PACKED:
        packed_int.prepare_layers(model, PACKED[config.quantization](config.hf_config["quantization_config"]))


def after_loading(model: nn.Module, config: ModelConfig) -> None:
    """Quantize the loaded float weights (quantization="int8"), or hand a pre-quantized
    checkpoint's layers their kernels."""
    layers = [m for m in model.modules() if isinstance(m, _Linear)]
    described = "int8 weights (per-channel scales)"
    if config.quantization == "int8":
        for layer in layers:
            int8.quantize_layer(layer)
    elif config.quantization == "compressed-tensors":
        scheme = compressed_tensors.check_config(config.hf_config["quantization_config"])
        compressed_tensors.finish_layers(model, scheme)
        activations = f"per-token {scheme.activations}" if scheme.activations else "unquantized"
        described = f"{'int8' if scheme.weights == 'int' else 'fp8'} weights, {activations} activations"
    elif config.quantization in PACKED:
        fmt = PACKED[config.quantization](config.hf_config["quantization_config"])
        packed_int.finish_layers(model, fmt)
        described = f"{fmt.bits}-bit weights in groups of {fmt.group_size}"
    else:
        return
    log.info("quantization %s: %d linear layers of %s", config.quantization, len(layers), described)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights and their scales (what quantization shrinks)."""
    total = 0
    for layer in model.modules():
        if isinstance(layer, _Linear):
            total += sum(t.numel() * t.element_size() for name, t in layer.named_parameters() if name != "bias")
    return total
