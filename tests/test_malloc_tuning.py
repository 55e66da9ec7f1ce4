"""Processes that import pagedserve keep the memory their large temporaries free (glibc's malloc):
blocks of tens of MB allocated, written and freed step after step are faulted in once, not every
time; a user's own GLIBC_TUNABLES for malloc leave it as they chose."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

# three 24 MiB blocks written and freed, 6 times over: the minor page faults of the last 5 rounds
PROBE = """
import ctypes, resource
import pagedserve
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
for round_ in range(6):
    if round_ == 1:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
print(pagedserve.MALLOC_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _probe(tunables: str | None) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        environ["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True,
                         timeout=120)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="not glibc")
def test_freed_blocks_are_kept_unless_the_user_tunes_malloc():
    tuned, faults = _probe(None)
    untouched, faults_default = _probe("glibc.malloc.check=0")  # the user's own malloc tunables
    pages = 5 * 3 * (24 << 20) // 4096
    assert tuned == "True" and faults < pages // 10  # written in place again: faulted in once
    assert untouched == "False" and faults_default > pages // 2  # glibc's defaults unmap them
