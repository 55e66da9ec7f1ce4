"""Per-layer scales of an fp8 KV cache: the checkpoint's when it has them, else measured at startup.

Checkpoints (llm-compressor / compressed-tensors, vLLM's fp8 exports) carry one scalar per layer
named model.layers.N.self_attn.k_scale and .v_scale (or .attn.k_scale; an older kv_scale sets
both). Layers without them get scales measured once before serving: a fixed pseudo-random prompt
runs through the model with the cache in the model's dtype, and each layer's scale is its largest
key (value) magnitude times HEADROOM over the fp8 type's largest value, so later inputs up to
HEADROOM times larger than the calibration's still fit. The same checkpoint and settings always
give the same scales.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.kv_cache import allocate_kv_cache
from services.worker.layers.attention import Attention
from services.worker.layers.attention_backend import AttentionBackend
from services.worker.memory_profiler import dummy_prefill_metadata
from services.worker.quant.kv_fp8 import fp8_max, is_fp8
from shared.config import EngineConfig

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 256
HEADROOM = 4.0
_SCALE_NAME = re.compile(r"^(.*?)(\.attn)?\.(k_scale|v_scale|kv_scale)$")


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Set a checkpoint's KV scale on its layer's Attention; False when `name` is not a KV scale."""
    match = _SCALE_NAME.match(name)
    if match is None:
        return False
    modules = dict(model.named_modules())
    prefix = match.group(1)
    attn = modules.get(f"{prefix}.attn") or modules.get(f"model.{prefix}.attn")
    if not isinstance(attn, Attention):
        raise ValueError(f"checkpoint KV scale {name!r} belongs to no attention layer of the model")  # noqa: TRY004
    if tensor.numel() != 1:
        raise ValueError(f"checkpoint KV scale {name!r} must be one number per layer, got shape {tuple(tensor.shape)}")
    value = float(tensor.float().reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"checkpoint KV scale {name!r} must be a positive finite number, got {value}")
    kind = match.group(3)
    if kind in ("k_scale", "kv_scale"):
        attn.k_scale = value
    if kind in ("v_scale", "kv_scale"):
        attn.v_scale = value
    attn.kv_scales_from_checkpoint = True
    return True


def prepare_kv_scales(
    model: nn.Module, backend: AttentionBackend, config: EngineConfig, dtype: torch.dtype,
    device: torch.device, kv_dtype: torch.dtype,
) -> None:
    """With an fp8 cache, measure the scales of every layer the checkpoint gave none."""
    layers = [m for m in model.modules() if isinstance(m, Attention) and not m.kv_scales_from_checkpoint]
    if not is_fp8(kv_dtype) or not layers:
        return
    amax = _calibration_amax(model, backend, config, dtype, device, layers)
    limit = fp8_max(kv_dtype)
    for attn, (k_max, v_max) in zip(layers, amax):
        attn.k_scale = k_max * HEADROOM / limit if k_max > 0 else 1.0
        attn.v_scale = v_max * HEADROOM / limit if v_max > 0 else 1.0
    log.info("fp8 KV cache: measured the scales of %d layers (checkpoint gave %d)",
             len(layers), sum(isinstance(m, Attention) for m in model.modules()) - len(layers))


@torch.inference_mode()
def _calibration_amax(
    model: nn.Module, backend: AttentionBackend, config: EngineConfig, dtype: torch.dtype,
    device: torch.device, layers: list[Attention],
) -> list[tuple[float, float]]:
    """The largest |key| and |value| each layer sees over the calibration prompt."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen[id(module)] = (args[1].abs().amax().float(), args[2].abs().amax().float())

    handles = [attn.register_forward_pre_hook(record) for attn in layers]
    try:
        n = min(CALIBRATION_TOKENS, config.model.max_model_len)
        common, num_blocks = dummy_prefill_metadata([n], config.cache.block_size, device)
        kv_caches = allocate_kv_cache(config, num_blocks, dtype, device)  # the model's dtype: nothing quantized
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(config.model.vocab_size, (n,), generator=generator).to(device)
        with set_forward_context(ForwardContext(backend, backend.build(common), kv_caches)):
            model(input_ids, torch.arange(n, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [(float(seen[id(a)][0]), float(seen[id(a)][1])) for a in layers]
