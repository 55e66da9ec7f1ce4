"""Small C kernels for the CPU: compiled on first use with the system C compiler into
~/.cache/pagedserve/kernels (keyed by the source, the flags and this CPU's flags, since each is
built for this CPU) and loaded with ctypes. Each kernel splits its work over threads() threads
inside one call (ctypes releases the GIL), on the pool of kernels/cpu_pool.h: a decode step's
hundreds of kernel calls cost microseconds each, where a Python thread pool cost ~100 us per call,
and a thread the OS has not scheduled never holds a call up, as OpenMP's barrier did on a busy
machine. Without a compiler, load() returns None and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_DIR = Path(os.environ.get("PAGEDSERVE_KERNEL_CACHE", Path.home() / ".cache" / "pagedserve" / "kernels"))
# The parts of -ffast-math that let the compiler vectorize the reductions, not -ffast-math itself:
# linked into a shared library it turns on flush-to-zero for the whole process that loads it.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
         "-freciprocal-math", "-ffp-contract=fast", "-shared", "-fPIC"]
# the kernels' sources include each other and these headers: all are part of each build's key
SOURCES = ("*.h", "*.c")


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _build(source: Path) -> Path:
    kernels = sorted(path for pattern in SOURCES for path in Path(__file__).parent.glob(pattern))
    text = source.read_bytes() + b"".join(path.read_bytes() for path in kernels)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = CACHE_DIR / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE_DIR)
    os.close(fd)
    try:
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, *FLAGS, "-I", str(Path(__file__).parent), "-o", tmp, str(source), "-lm", "-lpthread"],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent builder never loads half a file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@cache
def load(source: Path, what: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (once per process), or None, logged, when it cannot be built."""
    try:
        return ctypes.CDLL(str(_build(source)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s unavailable (%s); the torch path runs instead", what, exc)
        return None


def load_function(source: Path, what: str, name: str, argtypes: list) -> ctypes.CDLL | None:
    """load(), with the argument types of its function `name` (which returns nothing) declared."""
    lib = load(source, what)
    if lib is not None:
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


_threads: int | None = None


def threads() -> int:
    """How many threads the kernels split their work over: the count set_threads gave, else torch's."""
    if _threads is not None:
        return _threads
    import torch

    return torch.get_num_threads()


def set_threads(count: int | None) -> None:
    """Fix the kernels' thread count (None: follow torch's), so that torch's own count can
    change from step to step without changing theirs."""
    global _threads
    _threads = count

