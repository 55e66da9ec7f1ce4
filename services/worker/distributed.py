"""Tensor-parallel helpers over the default torch.distributed group.

Every worker process is one tensor-parallel rank, so the world group is the TP group. Without an
initialized process group (one process, tests) the rank is 0, the size 1 and collectives are no-ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    """This process's tensor-parallel rank."""
    return dist.get_rank() if _initialized() else 0


def tp_size() -> int:
    """The tensor-parallel world size."""
    return dist.get_world_size() if _initialized() else 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place; returns x."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along dim, in rank order."""
    size = tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def tp_all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj (picklable), in rank order."""
    size = tp_size()
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered
