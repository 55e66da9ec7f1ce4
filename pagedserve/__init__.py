"""pagedserve: a PagedAttention LLM inference and serving engine."""

import ctypes
import os
import sys

# torch's OpenMP threads sleep between parallel regions instead of spinning: on the CPU the spinning
# took cycles from the C kernels' own threads in the same step (`pagedserve bench throughput` on
# smol135, float32, a 2-core EPYC: +3.8% output tokens/s over 4 alternating runs). Only where the
# user has not chosen, and before torch loads OpenMP (every service starts through pagedserve.cli).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> bool:
    """glibc's malloc keeps freed blocks of up to 32 MiB for reuse, and up to 1 GiB free at the
    heap's top, instead of handing them back to the OS: a step's activations (tens of MB each) were
    mapped, faulted in and zeroed afresh step after step (`pagedserve bench throughput`, smol135,
    float32, a 2-core EPYC: 1.021-1.067x output tokens/s over 6 alternating pairs). Not where the
    user tunes malloc (GLIBC_TUNABLES), nor without glibc. Returns whether it applied."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


MALLOC_TUNED = _keep_freed_memory()

from pagedserve.llm import LLM
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from shared.lora import LoRARequest
from shared.sampling_params import SamplingParams, StructuredOutputsParams
from shared.version import VERSION as __version__

__all__ = ["LLM", "CompletionOutput", "LoRARequest", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]
