"""pagedserve: a PagedAttention LLM inference and serving engine."""

import os
import sys

# torch's OpenMP threads sleep between parallel regions instead of spinning: on the CPU the spinning
# took cycles from the C kernels' own threads in the same step (`pagedserve bench throughput` on
# smol135, float32, a 2-core EPYC: +3.8% output tokens/s over 4 alternating runs). Only where the
# user has not chosen, and before torch loads OpenMP (every service starts through pagedserve.cli).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pagedserve.llm import LLM
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from shared.lora import LoRARequest
from shared.sampling_params import SamplingParams, StructuredOutputsParams
from shared.version import VERSION as __version__

__all__ = ["LLM", "CompletionOutput", "LoRARequest", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]
