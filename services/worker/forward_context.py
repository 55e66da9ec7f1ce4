"""Per-step forward metadata, set once around a model forward through one context manager.

Attention layers read the step's metadata and their layer's KV cache from here instead of having
them threaded through every module; nothing is left behind between steps. The other fused layers
(RMSNorm, rotary, SiLU-and-mul) ask use_triton_kernels() whether to run their Triton kernels:
they do when the step's attention backend is Triton, so one choice picks the whole kernel set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.worker.layers.attention_backend import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any  # what backend.build() returned for this step
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    lora: Any = None  # the step's LoRAMapping (services/worker/lora); None: every row runs the base model


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention ran outside set_forward_context()")
    return _current


def current_lora() -> Any:
    """The running step's LoRA mapping, or None (outside a forward, or no adapter in the step)."""
    return None if _current is None else _current.lora


def use_triton_kernels() -> bool:
    """True inside a forward whose attention backend is Triton (CUDA, or the interpreter)."""
    return _current is not None and _current.backend.name == "triton"
