"""Which quantization a model runs with, and applying it once its weights are loaded."""

from __future__ import annotations

import logging

import torch
from torch import nn

from services.worker.layers.linear import _Linear
from services.worker.quant import int8

log = logging.getLogger(__name__)


def check_quantization(method: str | None, device: torch.device) -> None:
    """Fail at startup, naming the scheme and the device, where no kernel runs it."""
    if method == "int8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        raise ValueError(f"quantization int8 needs a GPU of compute capability 7.5 or later for its Triton "
                         f"kernel; {torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")


def apply_quantization(model: nn.Module, method: str | None, device: torch.device) -> None:
    """Quantize the loaded model's linear layers in place for `method` (None: nothing to do)."""
    if method is None:
        return
    check_quantization(method, device)
    layers = [m for m in model.modules() if isinstance(m, _Linear)]
    for layer in layers:
        int8.quantize_layer(layer)
    log.info("quantization %s: %d linear layers in int8 (per-channel scales)", method, len(layers))


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights and their scales (what quantization shrinks)."""
    total = 0
    for layer in model.modules():
        if isinstance(layer, _Linear):
            total += sum(t.numel() * t.element_size() for name, t in layer.named_parameters() if name != "bias")
    return total
