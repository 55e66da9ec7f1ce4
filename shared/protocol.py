"""Messages between engine, workers and frontends: one small msgspec Struct per message.

The same Structs are passed directly between objects in the offline (one-process) engine and
encoded onto ZeroMQ frames by the service stack.
"""

from __future__ import annotations

import msgspec

from shared.sampling_params import SamplingParams

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False)


# ----- engine -> worker: step plans carry deltas -------------------------------------------


class NewRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker has not seen (or sees again after preemption): everything it needs."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated before a preemption; recomputed with the prompt
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits)


class CachedRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker already holds: only the blocks added this step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class StepPlan(msgspec.Struct, **_STRUCT):
    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    finished_req_ids: list[str]  # the worker drops their state

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


# ----- worker -> engine --------------------------------------------------------------------


class TokenLogprobs(msgspec.Struct, **_STRUCT):
    """Logprobs at one position: index 0 is the sampled token, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int  # 1-based rank of the sampled token


class StepResult(msgspec.Struct, **_STRUCT):
    step_id: int
    req_ids: list[str]  # requests that sampled a token this step (finished their prompt)
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = []


# ----- engine -> frontend / offline driver --------------------------------------------------


class RequestDelta(msgspec.Struct, **_STRUCT):
    """What one step added to one request."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = []
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | None = None  # the stop token id that finished it
    num_cached_tokens: int = 0
