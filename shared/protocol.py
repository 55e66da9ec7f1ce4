"""Messages between engine, workers and frontends: one small msgspec Struct per message.

The same Structs are passed directly between objects in the offline (one-process) engine and
encoded onto ZeroMQ frames by the service stack.
"""

from __future__ import annotations

import msgspec
import numpy as np

from shared.sampling_params import SamplingParams

# Token id arrays (int32) travel in their own zero-copy frames, not inside the msgpack body.
TokenIds = np.ndarray

_STRUCT = {"array_like": True, "omit_defaults": True, "gc": False}


# ----- engine -> worker: step plans carry deltas -------------------------------------------


class NewRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker has not seen (or sees again after preemption): everything it needs."""

    req_id: str
    prompt_token_ids: TokenIds
    output_token_ids: TokenIds  # tokens generated before a preemption; recomputed with the prompt
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits)


class CachedRequestData(msgspec.Struct, **_STRUCT):
    """A request the worker already holds: only the blocks added this step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class StepPlan(msgspec.Struct, tag=True, **_STRUCT):
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


class StepResult(msgspec.Struct, tag=True, **_STRUCT):
    step_id: int
    req_ids: list[str]  # requests that sampled a token this step (finished their prompt)
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = []
    # requests with prompt_logprobs: one entry per prompt token this step scored (token i+1 of
    # the prompt, predicted at position i of a prefill chunk)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
    # requests the worker could not take (e.g. a structured-outputs grammar that does not compile)
    failed: dict[str, str] = {}
    # requests whose structured-outputs grammar completed with this step's token: the engine
    # finishes them with "stop" (nothing more can be generated that fits the grammar)
    stopped: list[str] = []


# ----- engine -> frontend / offline driver --------------------------------------------------


class RequestDelta(msgspec.Struct, **_STRUCT):
    """What one step added to one request."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = []
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | None = None  # the stop token id that finished it
    num_cached_tokens: int = 0
    # with the request's first token, if it asked for prompt_logprobs: prompt tokens 1.. in order
    prompt_logprobs: list[TokenLogprobs] = []
    error: str | None = None  # finish_reason "error": why the request failed (a client error)


# ----- frontend <-> engine ------------------------------------------------------------------
# Frontends connect two DEALER sockets (same identity) to the engine's input and output ROUTERs.


class AddRequest(msgspec.Struct, tag=True, **_STRUCT):
    req_id: str
    prompt_token_ids: TokenIds
    sampling_params: SamplingParams
    priority: int = 0  # with --scheduling-policy priority: lower runs first, higher is preempted first
    # a resumption (the frontend resubmits a request a restarted engine lost): the tokens it had
    # generated already; the engine continues after them and counts them against max_tokens
    output_token_ids: TokenIds | None = None


class AbortRequests(msgspec.Struct, tag=True, **_STRUCT):
    req_ids: list[str]


class Ping(msgspec.Struct, tag=True, **_STRUCT):
    """Answered by a Pong once it has passed through the engine's step loop."""

    ping_id: int


class Hello(msgspec.Struct, tag=True, **_STRUCT):
    """A frontend joining; answered with ModelInfo."""

    frontend_id: str


class Goodbye(msgspec.Struct, tag=True, **_STRUCT):
    frontend_id: str


class FrontendHeartbeat(msgspec.Struct, tag=True, **_STRUCT):
    """Sent every HEARTBEAT_INTERVAL_S by each frontend: an engine that hears nothing from a
    frontend for its frontend timeout counts it as gone, aborts its requests and frees their blocks."""

    frontend_id: str


FrontendMessage = AddRequest | AbortRequests | Ping | Hello | Goodbye | FrontendHeartbeat


class Outputs(msgspec.Struct, tag=True, **_STRUCT):
    deltas: list[RequestDelta]


class RequestFailed(msgspec.Struct, tag=True, **_STRUCT):
    req_id: str
    message: str
    status: int = 400  # HTTP status the frontend should answer with


class Pong(msgspec.Struct, tag=True, **_STRUCT):
    ping_id: int
    num_running: int = 0
    num_waiting: int = 0
    engine_id: str = ""  # changes when the engine restarts
    workers_ready: bool = True  # every worker rank is connected and alive


class ModelInfo(msgspec.Struct, tag=True, **_STRUCT):
    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    generation_defaults: dict[str, float | int] = {}
    num_blocks: int = 0
    block_size: int = 16
    engine_id: str = ""  # a fresh id per engine process: frontends tell a restarted engine apart


EngineMessage = Outputs | RequestFailed | Pong | ModelInfo


# ----- engine <-> worker --------------------------------------------------------------------
# Workers connect a DEALER to the engine's worker ROUTER: a handshake, then plans and results;
# a second DEALER per worker carries its heartbeats.

HEARTBEAT_INTERVAL_S = 1.0


class WorkerReady(msgspec.Struct, tag=True, **_STRUCT):
    rank: int
    world_size: int
    num_blocks: int
    block_size: int
    max_model_len: int
    instance_id: str = ""  # fresh per worker process


class WorkerFailed(msgspec.Struct, tag=True, **_STRUCT):
    rank: int
    step_id: int
    message: str


class WorkerHeartbeat(msgspec.Struct, tag=True, **_STRUCT):
    """Sent every HEARTBEAT_INTERVAL_S by a thread of each worker, during steps too: an engine
    that hears nothing from a rank for its worker timeout counts the rank as lost."""

    rank: int
    instance_id: str = ""


class WorkerAccepted(msgspec.Struct, tag=True, **_STRUCT):
    """The engine's answer to WorkerReady, and its order to start afresh. The engine bumps epoch
    whenever a rank is lost or re-joins (it then recomputes every request from its tokens); a
    worker drops its request state whenever (engine_id, epoch) differs from what it last had."""

    engine_id: str
    epoch: int = 0


class Shutdown(msgspec.Struct, tag=True, **_STRUCT):
    """The engine is stopping, or (rejected=True) will not use this worker: its settings do not
    match the engine's, so the worker exits with an error instead of serving wrong plans."""

    reason: str = ""
    rejected: bool = False


WorkerToEngine = WorkerReady | WorkerHeartbeat | StepResult | WorkerFailed
EngineToWorker = StepPlan | WorkerAccepted | Shutdown
