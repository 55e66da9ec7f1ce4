"""The frontend's table of the requests it has open at the engine.

Each entry keeps what it takes to resubmit the request to a restarted engine: the prompt, the
parameters and the tokens the engine has streamed so far. On the wire a request goes by its
caller's id the first time and by ``<id>~<k>`` after its k-th resumption: an AddRequest that sat
in the socket while the engine was down reaches the new engine too, and a fresh wire id keeps the
two apart (the stale one is aborted, and its outputs are no longer routed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
import numpy as np

from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.protocol import AddRequest, RequestDelta, RequestFailed
from shared.sampling_params import SamplingParams

# What a request's queue yields: the engine's deltas, or the engine's refusal.
StreamItem = RequestDelta | RequestFailed


@dataclass
class OpenRequest:
    req_id: str
    queue: asyncio.Queue
    prompt: np.ndarray | None = None
    params: SamplingParams | None = None
    priority: int = 0
    lora_request: LoRARequest | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far, as the engine reported them
    wire_id: str = ""
    engine_id: str | None = None  # the engine instance it was last submitted to
    live: bool = False  # submitted and still generating (not finished, failed or aborted)
    resumptions: int = 0
    pooling: PoolingParams | None = None


class OpenRequests:
    """Caller ids -> OpenRequest, and wire ids -> caller ids for routing the engine's outputs."""

    def __init__(self) -> None:
        self._by_id: dict[str, OpenRequest] = {}
        self._by_wire: dict[str, OpenRequest] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def register(self, req_ids: list[str]) -> asyncio.Queue[StreamItem]:
        """One queue for all ``req_ids`` (a request's n children share it)."""
        if any(req_id in self._by_id for req_id in req_ids):
            raise ValueError(f"a request id of {req_ids!r} is already registered")
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        for req_id in req_ids:
            self._by_id[req_id] = OpenRequest(req_id, queue)
        return queue

    def release(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            entry = self._by_id.pop(req_id, None)
            if entry is not None:
                self._by_wire.pop(entry.wire_id, None)

    def submit(
        self, req_id: str, prompt: np.ndarray, params: SamplingParams, priority: int, engine_id: str | None,
        pooling: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AddRequest:
        """The AddRequest of a registered request's first submission."""
        entry = self._by_id[req_id]
        entry.prompt, entry.params, entry.priority, entry.pooling = prompt, params, priority, pooling
        entry.lora_request = lora_request
        entry.engine_id, entry.live, entry.wire_id = engine_id, True, req_id
        self._by_wire[req_id] = entry
        return AddRequest(req_id, prompt, params, priority, pooling=pooling, lora_request=lora_request)

    def stop(self, req_ids: list[str]) -> list[str]:
        """Mark these requests as no longer generating; their wire ids, to abort at the engine."""
        wire = []
        for req_id in req_ids:
            entry = self._by_id.get(req_id)
            if entry is not None and entry.live:
                entry.live = False
                wire.append(entry.wire_id)
        return wire

    def route(self, delta: RequestDelta) -> tuple[asyncio.Queue, RequestDelta] | None:
        """The queue for an engine delta and the delta under its caller's id (None: not ours)."""
        entry = self._by_wire.get(delta.req_id)
        if entry is None:
            return None
        entry.tokens.extend(delta.new_token_ids)
        if delta.finish_reason is not None:
            entry.live = False
        if delta.req_id != entry.req_id:
            delta = msgspec.structs.replace(delta, req_id=entry.req_id)
        return entry.queue, delta

    def route_failure(self, failed: RequestFailed) -> tuple[asyncio.Queue, RequestFailed] | None:
        entry = self._by_wire.get(failed.req_id)
        if entry is None:
            return None
        entry.live = False
        return entry.queue, msgspec.structs.replace(failed, req_id=entry.req_id)

    def fail_wire(self, wire_id: str, message: str, status: int) -> None:
        """Answer one request with a failure of our own (e.g. its AddRequest could not be sent)."""
        entry = self._by_wire.get(wire_id)
        if entry is not None:
            self._fail(entry, message, status)

    def fail_all(self, message: str, status: int) -> None:
        for entry in self._by_id.values():
            self._fail(entry, message, status)

    @staticmethod
    def _fail(entry: OpenRequest, message: str, status: int) -> None:
        entry.live = False
        entry.queue.put_nowait(RequestFailed(entry.req_id, message, status))

    def resume_on(self, engine_id: str) -> tuple[list[str], list[AddRequest]]:
        """Every live request submitted to another engine, resubmitted to ``engine_id`` after the
        tokens it has: (stale wire ids to abort, the AddRequests)."""
        stale, adds = [], []
        for entry in self._by_id.values():
            if not entry.live or entry.engine_id == engine_id:
                continue
            stale.append(entry.wire_id)
            del self._by_wire[entry.wire_id]
            entry.resumptions += 1
            entry.wire_id = f"{entry.req_id}~{entry.resumptions}"
            entry.engine_id = engine_id
            self._by_wire[entry.wire_id] = entry
            tokens = np.asarray(entry.tokens, dtype=np.int32) if entry.tokens else None
            adds.append(AddRequest(entry.wire_id, entry.prompt, entry.params, entry.priority, tokens, entry.pooling,
                                   entry.lora_request))
        return stale, adds
