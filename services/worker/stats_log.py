"""Startup logs: how long each phase of a worker's start took (weights, KV cache sizing and
allocation, CUDA graph capture), and progress bars over the checkpoint's weight files and the
CUDA graphs being captured."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("pagedserve.worker.startup")
T = TypeVar("T")


@contextlib.contextmanager
def startup_phase(name: str, logged: bool = True) -> Iterator[None]:
    """Log '<name> took N.NN s' once the block has run (unless not ``logged``: nothing to say)."""
    start = time.perf_counter()
    yield
    if logged:
        log.info("%s took %.2f s", name, time.perf_counter() - start)


def progress(items: Sequence[T], desc: str, unit: str) -> Iterator[T]:
    """``items`` with a tqdm bar, as vLLM shows while it loads shards and captures graphs."""
    yield from tqdm(items, desc=desc, unit=unit, dynamic_ncols=True)


def shard_progress(files: Sequence[Path]) -> Iterator[Path]:
    kind = "pt" if files and files[0].suffix == ".bin" else "safetensors"
    return progress(files, f"Loading {kind} checkpoint shards", "shard")
