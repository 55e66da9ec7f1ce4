"""Messages between engine, workers and frontends: one small msgspec Struct per message.

The same Structs are passed directly between objects in the offline (one-process) engine and
encoded onto ZeroMQ frames by the service stack. Every message is validated when it is built and
when it is decoded (msgspec runs the field constraints and __post_init__ on both): a message of
the wrong shape fails with ValueError, before any service code sees it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.sampling_params import SamplingParams

# Token id arrays (1-D int32) travel in their own zero-copy frames, not inside the msgpack body.
TokenIds = np.ndarray

MAX_ID_LEN = 256  # request and frontend ids
ReqId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
Count = Annotated[int, Meta(ge=0)]  # counts, block ids, step ids, ranks
Positive = Annotated[int, Meta(ge=1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e12)]  # durations, and wall-clock times

_STRUCT = {"array_like": True, "omit_defaults": True, "gc": False}


def check_token_ids(name: str, ids: TokenIds | None) -> None:
    """Token ids cross process boundaries as 1-D int32 arrays of non-negative ids."""
    if ids is None:
        return
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int32:
        shape = f"{ids.ndim}-D {ids.dtype}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-D int32 array, got {shape}")
    if ids.size and int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative token ids")


# ----- engine -> worker: step plans carry deltas -------------------------------------------


class NewRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker has not seen (or sees again after preemption): everything it needs."""

    req_id: ReqId
    prompt_token_ids: TokenIds
    output_token_ids: TokenIds  # tokens generated before a preemption; recomputed with the prompt
    sampling_params: SamplingParams
    eos_token_ids: list[TokenId]
    block_ids: list[Count]
    num_computed_tokens: Count  # tokens already in the cache (prefix-cache hits)
    pooling: PoolingParams | None = None  # a pooling request: its prompt's pooled vector, no tokens
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    def __post_init__(self) -> None:
        check_token_ids("prompt_token_ids", self.prompt_token_ids)
        check_token_ids("output_token_ids", self.output_token_ids)


class CachedRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker already holds: only the blocks added this step."""

    req_id: ReqId
    new_block_ids: list[Count]
    num_computed_tokens: Count
    # speculative decoding rolled its KV back since the last plan: the worker keeps only its first
    # num_kept_blocks blocks before adding new_block_ids (None: it keeps them all)
    num_kept_blocks: Count | None = None


class StepPlan(msgspec.Struct, tag=True, **_STRUCT):
    step_id: Count
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[ReqId, Positive]  # req_id -> tokens to compute this step
    finished_req_ids: list[ReqId]  # the worker drops their state
    # speculative decoding: tokens proposed for a decoding request, computed after its last token
    # (counted in num_scheduled_tokens) and verified by sampling every position; with proposals on
    # the workers (async scheduling) none, and a decoding request's count past 1 is slots for theirs
    spec_token_ids: dict[ReqId, TokenIds] = {}
    num_draft_tokens: dict[ReqId, Positive] = {}  # tokens the workers propose after this step (absent: none)

    def __post_init__(self) -> None:
        for req_id, ids in self.spec_token_ids.items():
            check_token_ids(f"spec_token_ids[{req_id!r}]", ids)
            if ids.size + 1 > self.num_scheduled_tokens.get(req_id, 0):
                raise ValueError(f"spec_token_ids[{req_id!r}] needs its tokens and one more scheduled")
        if not self.num_draft_tokens.keys() <= self.num_scheduled_tokens.keys():
            raise ValueError("num_draft_tokens names a request this step does not schedule")

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


# ----- worker -> engine --------------------------------------------------------------------


class TokenLogprobs(msgspec.Struct, **_STRUCT):
    """Logprobs at one position: index 0 is the sampled token, then the top-k."""

    token_ids: list[TokenId]
    logprobs: list[float]
    rank: Positive  # 1-based rank of the sampled token


class StepResult(msgspec.Struct, tag=True, **_STRUCT):
    step_id: Count
    # requests that sampled a token this step (finished their prompt); a request that verified
    # proposed tokens appears once per token it got (the accepted ones, then one sampled), in order
    req_ids: list[ReqId]
    sampled_token_ids: list[TokenId]
    logprobs: list[TokenLogprobs | None] = []
    # requests with prompt_logprobs: one entry per prompt token this step scored (token i+1 of
    # the prompt, predicted at position i of a prefill chunk)
    prompt_logprobs: dict[ReqId, list[TokenLogprobs]] = {}
    # requests the worker could not take (e.g. a structured-outputs grammar that does not compile)
    failed: dict[ReqId, str] = {}
    # requests whose structured-outputs grammar completed with this step's token: the engine
    # finishes them with "stop" (nothing more can be generated that fits the grammar)
    stopped: list[ReqId] = []
    # the worker's side of the step timeline: when it took the plan (wall clock, time.time()),
    # how long it had waited for it since its previous step, and how long it computed
    received_at: Seconds = 0.0
    idle_s: Seconds = 0.0
    compute_s: Seconds = 0.0
    pooled: dict[ReqId, list[float]] = {}  # pooling requests that finished their prompt this step
    # speculative decoding with a draft model, proposals on the engine: the tokens the workers' draft
    # proposes to follow each sampling request's tokens, for the engine to schedule with its next step
    draft_token_ids: dict[ReqId, TokenIds] = {}
    num_proposed: dict[ReqId, Positive] = {}  # proposals it verified (a grammar cuts those it forbids)

    def __post_init__(self) -> None:
        for req_id, ids in self.draft_token_ids.items():
            check_token_ids(f"draft_token_ids[{req_id!r}]", ids)
        if len(self.sampled_token_ids) != (n := len(self.req_ids)) or (self.logprobs and len(self.logprobs) != n):
            raise ValueError("a step result needs one sampled token (and logprobs entry) per request")


# ----- engine -> frontend / offline driver --------------------------------------------------


class RequestDelta(msgspec.Struct, **_STRUCT):
    """What one step added to one request."""

    req_id: ReqId
    new_token_ids: list[TokenId]
    new_logprobs: list[TokenLogprobs] = []
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: TokenId | None = None  # the stop token id that finished it
    num_cached_tokens: Count = 0
    # with the request's first token, if it asked for prompt_logprobs: prompt tokens 1.. in order
    prompt_logprobs: list[TokenLogprobs] = []
    error: str | None = None  # finish_reason "error": why the request failed (a client error)
    pooled: list[float] | None = None  # a pooling request's result (it finishes with it)


# ----- frontend <-> engine ------------------------------------------------------------------
# Frontends connect two DEALER sockets (same identity) to the engine's input and output ROUTERs.


class AddRequest(msgspec.Struct, tag=True, **_STRUCT):
    req_id: ReqId
    prompt_token_ids: TokenIds
    sampling_params: SamplingParams
    priority: Int64 = 0  # with --scheduling-policy priority: lower runs first, higher is preempted first
    # a resumption (the frontend resubmits a request a restarted engine lost): the tokens it had
    # generated already; the engine continues after them and counts them against max_tokens
    output_token_ids: TokenIds | None = None
    pooling: PoolingParams | None = None  # a pooling request (sampling_params is then unused)
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    def __post_init__(self) -> None:
        check_token_ids("prompt_token_ids", self.prompt_token_ids)
        check_token_ids("output_token_ids", self.output_token_ids)


class AbortRequests(msgspec.Struct, tag=True, **_STRUCT):
    req_ids: list[ReqId]


class Ping(msgspec.Struct, tag=True, **_STRUCT):
    """Answered by a Pong once it has passed through the engine's step loop."""

    ping_id: Count


class Hello(msgspec.Struct, tag=True, **_STRUCT):
    """A frontend joining; answered with ModelInfo."""

    frontend_id: ReqId


class Goodbye(msgspec.Struct, tag=True, **_STRUCT):
    frontend_id: ReqId


class FrontendHeartbeat(msgspec.Struct, tag=True, **_STRUCT):
    """Sent every HEARTBEAT_INTERVAL_S by each frontend: an engine that hears nothing from a
    frontend for its frontend timeout counts it as gone, aborts its requests and frees their blocks."""

    frontend_id: ReqId


FrontendMessage = AddRequest | AbortRequests | Ping | Hello | Goodbye | FrontendHeartbeat


class Outputs(msgspec.Struct, tag=True, **_STRUCT):
    deltas: list[RequestDelta]


class RequestFailed(msgspec.Struct, tag=True, **_STRUCT):
    req_id: ReqId
    message: str
    status: Annotated[int, Meta(ge=400, le=599)] = 400  # HTTP status the frontend should answer with
    param: str | None = None  # the request field at fault, when the engine knows it


class Pong(msgspec.Struct, tag=True, **_STRUCT):
    ping_id: Count
    num_running: Count = 0
    num_waiting: Count = 0
    engine_id: str = ""  # changes when the engine restarts
    workers_ready: bool = True  # every worker rank is connected and alive
    kv_cache_usage: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0  # KV blocks in use (0 from an engine without it)
    running_loras: list[str] = []  # the LoRA adapters (names) of the running requests
    waiting_loras: list[str] = []  # and of the waiting ones


class ModelInfo(msgspec.Struct, tag=True, **_STRUCT):
    model_name: str
    model_path: str
    max_model_len: Positive
    vocab_size: Positive
    eos_token_ids: list[TokenId]
    generation_defaults: dict[str, float | int] = {}
    num_blocks: Count = 0
    block_size: Positive = 16
    engine_id: str = ""  # a fresh id per engine process: frontends tell a restarted engine apart
    # the engine's --max-num-queued-requests (0: not told): a wider n fan-out gets 400, not a vain 503
    max_num_queued_requests: Count = 0
    task: str = "generate"  # "generate", "embed" or "classify" (shared.pooling.TASKS)
    max_lora_rank: Count = 0  # the engine's --max-lora-rank; 0: LoRA adapters are not enabled
    max_loras: Count = 0  # the engine's --max-loras: the most adapters in one batch
    labels: list[str] = []  # a classifier's label names, in class order (/classify)


EngineMessage = Outputs | RequestFailed | Pong | ModelInfo


# ----- engine <-> worker --------------------------------------------------------------------
# Workers connect a DEALER to the engine's worker ROUTER: a handshake, then plans and results;
# a second DEALER per worker carries its heartbeats.

HEARTBEAT_INTERVAL_S = 1.0


class WorkerReady(msgspec.Struct, tag=True, **_STRUCT):
    rank: Count
    world_size: Positive
    num_blocks: Count
    block_size: Positive
    max_model_len: Positive
    instance_id: str = ""  # fresh per worker process


class WorkerFailed(msgspec.Struct, tag=True, **_STRUCT):
    rank: Count
    step_id: Count
    message: str


class WorkerHeartbeat(msgspec.Struct, tag=True, **_STRUCT):
    """Sent every HEARTBEAT_INTERVAL_S by a thread of each worker, during steps too: an engine
    that hears nothing from a rank for its worker timeout counts the rank as lost."""

    rank: Count
    instance_id: str = ""


class WorkerAccepted(msgspec.Struct, tag=True, **_STRUCT):
    """The engine's answer to WorkerReady, and its order to start afresh. The engine bumps epoch
    whenever a rank is lost or re-joins (it then recomputes every request from its tokens); a
    worker drops its request state whenever (engine_id, epoch) differs from what it last had."""

    engine_id: str
    epoch: Count = 0


class Shutdown(msgspec.Struct, tag=True, **_STRUCT):
    """The engine is stopping, or (rejected=True) will not use this worker: its settings do not
    match the engine's, so the worker exits with an error instead of serving wrong plans."""

    reason: str = ""
    rejected: bool = False


WorkerToEngine = WorkerReady | WorkerHeartbeat | StepResult | WorkerFailed
EngineToWorker = StepPlan | WorkerAccepted | Shutdown
