"""pagedserve: a PagedAttention LLM inference and serving engine."""

from pagedserve.llm import LLM
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from shared.lora import LoRARequest
from shared.sampling_params import SamplingParams, StructuredOutputsParams
from shared.version import VERSION as __version__

__all__ = ["LLM", "CompletionOutput", "LoRARequest", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]
