"""Tensor- and pipeline-parallel helpers over torch.distributed.

A replica's ranks form pipeline stages of tensor-parallel groups: stage s holds ranks
s*T .. s*T+T-1 (T ranks per stage). init_parallel_groups builds the groups once, after the
process group exists; without it, the world is one tensor-parallel group (one stage). Without an
initialized process group (one process, tests) every rank and stage is 0, every size 1 and
collectives are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class _Groups:
    tp_group: Any  # this stage's tensor-parallel ProcessGroup
    pp_rank: int
    pp_size: int
    tp_alone: bool = False  # inside whole_model(sharded=False): tensor-parallel rank 0 of 1


_groups: _Groups | None = None  # set once per process by init_parallel_groups


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_parallel_groups(tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Split the world into pipeline stages of ``tensor_parallel_size`` ranks (every rank
    creates every group, in the same order, as torch.distributed requires)."""
    global _groups
    if tensor_parallel_size * pipeline_parallel_size != dist.get_world_size():
        raise ValueError(f"{tensor_parallel_size} x {pipeline_parallel_size} ranks, but the world has "
                         f"{dist.get_world_size()}")
    stage = dist.get_rank() // tensor_parallel_size
    group = dist.group.WORLD
    if pipeline_parallel_size > 1:
        stages = [dist.new_group(list(range(s * tensor_parallel_size, (s + 1) * tensor_parallel_size)))
                  for s in range(pipeline_parallel_size)]
        group = stages[stage]
    _groups = _Groups(group, stage, pipeline_parallel_size)


@contextmanager
def whole_model(sharded: bool = True) -> Iterator[None]:
    """Inside, pp_rank() is 0 and pp_size() 1: a model built here holds every layer, as the draft
    model beside the last stage's share of the target does. sharded: its weights are split over
    the stage's tensor-parallel ranks; otherwise tp_rank() is 0 and tp_size() 1 too, and the
    model, whole on this rank, never calls a collective. For construction only: a model reads
    its stage and its share when it is built."""
    global _groups
    saved = _groups
    if saved is not None:
        _groups = _Groups(saved.tp_group, 0, 1, tp_alone=not sharded)
    try:
        yield
    finally:
        _groups = saved


def _tp_group() -> Any:
    return _groups.tp_group if _groups is not None else None


def _tp_alone() -> bool:
    return not _initialized() or (_groups is not None and _groups.tp_alone)


def tp_rank() -> int:
    """This process's tensor-parallel rank within its stage."""
    return 0 if _tp_alone() else dist.get_rank(_tp_group())


def tp_size() -> int:
    """The tensor-parallel size (ranks per stage)."""
    return 1 if _tp_alone() else dist.get_world_size(_tp_group())


def pp_rank() -> int:
    """This process's pipeline stage."""
    return _groups.pp_rank if _groups is not None and _initialized() else 0


def pp_size() -> int:
    """The number of pipeline stages."""
    return _groups.pp_size if _groups is not None and _initialized() else 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the stage's ranks, in place; returns x."""
    if tp_size() > 1:
        dist.all_reduce(x, group=_tp_group())
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along dim, in rank order."""
    size = tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=_tp_group())
    return torch.cat(parts, dim=dim)


def world_all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj (picklable), in rank order, over every stage."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def group_failed(exc: BaseException) -> bool:
    """True when exc says the process group itself broke (a peer died, or a collective outlived
    the group's timeout, --dist-timeout): its ranks can no longer run steps together."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc).lower())
