"""Which quantization a model runs with, and applying it once its weights are loaded."""

from __future__ import annotations

import logging

import torch
from torch import nn

from services.worker.layers.linear import _Linear
from services.worker.quant import compressed_tensors, int8
from shared.config import ModelConfig

log = logging.getLogger(__name__)


def check_quantization(method: str | None, device: torch.device) -> None:
    """Fail at startup, naming the scheme and the device, where no kernel runs it."""
    if method in ("int8", "compressed-tensors") and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        raise ValueError(f"quantization {method} needs a GPU of compute capability 7.5 or later for its Triton "
                         f"kernel; {torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")


def before_loading(model: nn.Module, config: ModelConfig, device: torch.device) -> None:
    """Shape the layers for a pre-quantized checkpoint's tensors before they are loaded."""
    check_quantization(config.quantization, device)
    if config.quantization == "compressed-tensors":
        compressed_tensors.check_config(config.hf_config["quantization_config"])
        compressed_tensors.prepare_layers(model)
        model.skip_checkpoint_tensor = compressed_tensors.skipped


def after_loading(model: nn.Module, config: ModelConfig) -> None:
    """Quantize the loaded float weights (quantization="int8"), or hand a pre-quantized
    checkpoint's layers their kernels."""
    layers = [m for m in model.modules() if isinstance(m, _Linear)]
    if config.quantization == "int8":
        for layer in layers:
            int8.quantize_layer(layer)
    elif config.quantization == "compressed-tensors":
        compressed_tensors.finish_layers(model)
    else:
        return
    log.info("quantization %s: %d linear layers in int8 (per-channel scales)", config.quantization, len(layers))


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights and their scales (what quantization shrinks)."""
    total = 0
    for layer in model.modules():
        if isinstance(layer, _Linear):
            total += sum(t.numel() * t.element_size() for name, t in layer.named_parameters() if name != "bias")
    return total
