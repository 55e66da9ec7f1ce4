"""CPU tensors in memory backed by transparent huge pages: the model's weights and the KV cache.

A decode step streams every weight once, and its attention reads KV blocks scattered over the
cache. In 4 KiB pages that is a TLB miss every 4 KiB, and the CPU's prefetchers stop at each page
boundary; in 2 MiB pages neither happens. Where the kernel's transparent huge pages are in
"madvise" mode (a common default) memory gets them only when asked: an anonymous mapping, aligned
to 2 MiB and advised MADV_HUGEPAGE, is what this module hands out. Anywhere that cannot be done
(no madvise, huge pages "never") the same calls give ordinary memory; nothing depends on getting
huge pages but speed.
"""

from __future__ import annotations

import itertools
import math
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor in an arena starts on a cache line


def zeros(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of nbytes on the CPU, 2 MiB-aligned, advised to huge pages and
    written once, so its memory is taken now (as torch.zeros' is), not at a first use mid-step.
    The mapping lives as long as a tensor viewing it (never close it while one does)."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes].zero_()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def zeros_like_each(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero-filled CPU tensors of the given shapes and dtype, in one huge-page arena."""
    return _arena([(shape, dtype) for shape in shapes])


def _arena(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Zero-filled CPU tensors of the given (shape, dtype)s, each from a cache line of one arena."""
    nbytes = [torch.empty((), dtype=dtype).element_size() * math.prod(shape) for shape, dtype in specs]
    offsets = [0, *itertools.accumulate(_aligned(n) for n in nbytes)]
    arena = zeros(offsets[-1])
    return [arena[at:at + n].view(dtype).view(shape) for (shape, dtype), n, at in zip(specs, nbytes, offsets)]


def move_weights(model: nn.Module) -> None:
    """Move every CPU parameter and buffer of model into one huge-page arena, in place (a tensor
    shared by several modules, such as tied embeddings, stays shared). Call it on the model as
    built, before its weights are loaded: a parameter's old memory, never written, is never
    taken, and nothing has kept a weight's address yet (the CPU decode step takes them at its
    first call)."""
    tensors: dict[tuple, list[torch.Tensor]] = {}  # the same tensor held by several modules: once
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.numel():
                tensors.setdefault((t.data_ptr(), t.shape, t.dtype), []).append(t)
    if not tensors:
        return
    for uses, moved in zip(tensors.values(), _arena([(uses[0].shape, uses[0].dtype) for uses in tensors.values()])):
        moved.copy_(uses[0])
        for t in uses:
            t.data = moved  # the same Parameter (or buffer) object: its attributes and holders stay
