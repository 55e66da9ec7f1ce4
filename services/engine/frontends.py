"""The engine's side of the frontends: which are alive, which requests each one owns, and how
their messages reach the engine core and its outputs reach them.

A frontend is known by its routing identity. Any message from it counts as a sign of life
(frontends send a FrontendHeartbeat every HEARTBEAT_INTERVAL_S besides their requests); one that
stays silent for `timeout_s` counts as gone, and so do its requests. A Hello, heartbeat or request
from an unknown identity registers it (the engine may have restarted under a frontend that never
left); a Ping, abort or Goodbye alone does not, so a probe that pings and leaves is not counted.

Requests are taken only from a frontend that has said Hello to this engine instance. A frontend
says Hello once the engine's answers reach it (a Pong with a new engine id, or ModelInfo at
start); an AddRequest that sat in a frontend's socket while the engine was down can arrive
before that frontend's output connection, and its first outputs would be lost. The engine
drops such a request: the frontend resubmits it, with the tokens it has, after its Hello.
"""

from __future__ import annotations

import logging
import queue
import time

from services.engine.core import EngineCore
from services.engine.metrics import EngineMetrics
from shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    AbortRequests,
    AddRequest,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    RequestDelta,
    RequestFailed,
)

log = logging.getLogger("pagedserve.engine")

MAX_GREETED = 4096


class Frontends:
    """Liveness and request ownership, by routing identity."""

    def __init__(self, timeout_s: float):
        if timeout_s <= HEARTBEAT_INTERVAL_S:
            raise ValueError(f"the frontend timeout must exceed the {HEARTBEAT_INTERVAL_S}s heartbeat interval")
        self.timeout_s = timeout_s
        self.last_seen: dict[bytes, float] = {}
        self.owners: dict[str, bytes] = {}  # req_id -> frontend identity
        # frontends that said Hello to this engine; one dropped as silent stays greeted (it may
        # come back and send requests without a new Hello), until the set is full of such
        self.greeted: set[bytes] = set()

    def greet(self, identity: bytes) -> None:
        if len(self.greeted) >= MAX_GREETED:
            self.greeted.intersection_update(self.last_seen)
        self.greeted.add(identity)

    def __len__(self) -> int:
        return len(self.last_seen)

    def seen(self, identity: bytes, register: bool = True) -> bool:
        """Note a message from `identity` (registering it if unknown and `register`); True when
        it was registered now."""
        new = identity not in self.last_seen
        if register or not new:
            self.last_seen[identity] = time.monotonic()
        return new and register

    def leave(self, identity: bytes) -> list[str]:
        """Forget a frontend; returns the ids of the requests it owned (still to be aborted)."""
        self.last_seen.pop(identity, None)
        return [req_id for req_id, owner in self.owners.items() if owner == identity]

    def silent(self) -> list[bytes]:
        """Frontends not heard from for longer than the timeout."""
        cutoff = time.monotonic() - self.timeout_s
        return [identity for identity, seen in self.last_seen.items() if seen < cutoff]

    def claim(self, req_id: str, identity: bytes) -> None:
        """Record `identity` as the owner of a new request; ValueError when the id is taken."""
        if req_id in self.owners:
            raise ValueError(f"request id {req_id!r} is already in use")
        self.owners[req_id] = identity

    def owned_by(self, identity: bytes, req_ids: list[str]) -> list[str]:
        """The ids among req_ids that `identity` owns: a frontend aborts only its own requests."""
        return [req_id for req_id in req_ids if self.owners.get(req_id) == identity]


class FrontendHandler:
    """Applies frontend messages to the engine core and routes its outputs back to their owners
    (replies go to `outbox` as (identity, message) pairs)."""

    def __init__(
        self, core: EngineCore, metrics: EngineMetrics, outbox: queue.Queue, model_info: ModelInfo, table: Frontends
    ):
        self.core, self.metrics, self.outbox, self.model_info, self.table = core, metrics, outbox, model_info, table

    def handle(self, identity: bytes, msg) -> None:
        """Every message is a sign of life (a FrontendHeartbeat is nothing else); a Ping is
        answered by the caller once it has passed through the step loop."""
        if self.table.seen(identity, register=not isinstance(msg, (Ping, AbortRequests, Goodbye))):
            log.info("frontend %r connected", identity)
            self.metrics.frontends.set(len(self.table))
        if isinstance(msg, AddRequest):
            if identity in self.table.greeted:
                self._add(identity, msg)
            else:  # queued before this engine started: resubmitted after the frontend's Hello
                log.warning("dropped request %r from frontend %r, which has not said Hello", msg.req_id, identity)
        elif isinstance(msg, AbortRequests):
            self.route(self.core.abort(self.table.owned_by(identity, msg.req_ids)))
        elif isinstance(msg, Hello):
            self.table.greet(identity)
            self.outbox.put((identity, self.model_info))
        elif isinstance(msg, Goodbye):
            self.table.greeted.discard(identity)
            self.drop(identity)

    def drop(self, identity: bytes) -> None:
        """A frontend left (or went silent): abort its requests, their blocks return to the pool."""
        self.route(self.core.abort(self.table.leave(identity)))
        self.metrics.frontends.set(len(self.table))

    def drop_silent(self) -> None:
        for identity in self.table.silent():
            log.warning("frontend %r silent for %.0fs: its requests are aborted", identity, self.table.timeout_s)
            self.drop(identity)

    def _add(self, identity: bytes, msg: AddRequest) -> None:
        try:
            self.table.claim(msg.req_id, identity)
        except ValueError as exc:  # another request holds the id: refuse this one, touch nothing
            self.outbox.put((identity, RequestFailed(msg.req_id, str(exc), 400)))
            return
        try:
            outputs = None if msg.output_token_ids is None else msg.output_token_ids.tolist()
            request = self.core.make_request(
                msg.req_id, msg.prompt_token_ids.tolist(), msg.sampling_params, outputs, msg.priority, msg.pooling,
                lora_request=msg.lora_request,
            )
            # a resumption was admitted once already (by the engine that lost it): never refused
            refusal = None if outputs is not None else self.core.scheduler.admission_error(request)
            if refusal is not None:
                reason, message = refusal
                self.metrics.reject(reason)
                self.fail([msg.req_id], message, 503)
                return
            self.core.add_request(request)
        except ValueError as exc:  # an InvalidRequest names its field
            self.fail([msg.req_id], str(exc), 400, getattr(exc, "param", None))
        except Exception:
            self.fail([msg.req_id], "the engine could not take this request", 500)
            raise

    def fail(self, req_ids: list[str], message: str, status: int, param: str | None = None) -> None:
        """Tell each request's owner it failed; the requests must already be out of the core."""
        for req_id in req_ids:
            owner = self.table.owners.pop(req_id, None)
            if owner is not None:
                self.outbox.put((owner, RequestFailed(req_id, message, status, param)))

    def route(self, deltas: list[RequestDelta]) -> None:
        by_owner: dict[bytes, list[RequestDelta]] = {}
        for delta in deltas:
            owner = self.table.owners.get(delta.req_id)
            if owner is None:
                continue
            if delta.error is not None:  # the worker refused it: a client error, answered alone
                self.fail([delta.req_id], delta.error, 400)
                continue
            by_owner.setdefault(owner, []).append(delta)
            if delta.finish_reason is not None:
                del self.table.owners[delta.req_id]
        for owner, batch in by_owner.items():
            self.outbox.put((owner, Outputs(batch)))
