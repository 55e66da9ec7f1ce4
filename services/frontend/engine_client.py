"""The frontend's connection to the engine: two DEALER sockets with one identity.

Requests go out on the engine's input ROUTER; outputs, failures, pongs and model info come back
on its output ROUTER, which routes them by our identity: a random secret, never the public
frontend id (a peer that knew it could read our clients' tokens). A background task dispatches
what arrives: deltas and failures to the per-request queue the caller registered, pongs to the
ping that is waiting for them, model info to whoever awaits readiness. Every send goes through
one outbox drained by one task, so callers can abort synchronously (also from a cancelled task or
a ``finally``) and messages leave in the order they were queued.

The open requests (services.frontend.open_requests) outlive an engine: when a new engine
instance answers, each one still generating is resubmitted to it after the tokens it has.
The background tasks survive any error in one message; a message that cannot be sent fails its
request alone. Should a task end anyway, the process exits non-zero for its supervisor to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from services.frontend.open_requests import OpenRequests, StreamItem
from shared.auth import CurveClient
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT
from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    AbortRequests,
    AddRequest,
    EngineMessage,
    FrontendHeartbeat,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    RequestFailed,
)
from shared.sampling_params import SamplingParams
from shared.transport import AsyncDealerQueue

log = logging.getLogger(__name__)

__all__ = ["EngineClient", "StreamItem"]

# Errors of encoding a message: something in the request does not fit the wire (an integer
# beyond 64 bits, a lone surrogate), so the client's fault.
_ENCODE_ERRORS = (OverflowError, ValueError, TypeError, msgspec.EncodeError)
# Sent again every interval, so one the socket cannot take now is dropped rather than waited for.
_PERIODIC = (FrontendHeartbeat, Hello, Ping)
SHUTTING_DOWN = "The frontend is shutting down; the request did not finish within its shutdown timeout."


class EngineClient:
    """Async client of the engine for one frontend process.

    Lifecycle: ``await start()`` (sends Hello every ``interval`` seconds until the engine answers
    with ModelInfo, and a FrontendHeartbeat every ``interval`` for as long as it runs),
    ``await wait_ready()`` for the ModelInfo, then per request ``register`` / ``add_request`` /
    ``abort`` / ``release``; ``await drain(timeout)`` lets open requests finish, ``await close()``
    says Goodbye.
    """

    def __init__(
        self,
        input_addr: str = DEFAULT_ENGINE_INPUT,
        output_addr: str = DEFAULT_ENGINE_OUTPUT,
        frontend_id: str | None = None,
        security: CurveClient | None = None,
        interval: float = HEARTBEAT_INTERVAL_S,
    ):
        self.frontend_id = frontend_id or uuid.uuid4().hex
        # Request ids are unique across frontends (even two given the same id) and say nothing of
        # the identity.
        self.request_prefix = f"{self.frontend_id}-{os.urandom(4).hex()}"
        self.input_addr, self.output_addr = input_addr, output_addr
        self.security = security  # CURVE settings of both sockets (shared.auth); None: plain
        self.interval = interval
        self.model_info: ModelInfo | None = None
        self.last_pong: Pong | None = None  # the engine's latest load report (engine_gauges.py)
        self.last_pong_time = 0.0
        self.last_heard = 0.0  # time.monotonic() of the engine's latest message (replicas.py: is it up)
        self.draining = False
        self._identity = b"fe-" + os.urandom(16)  # secret: the engine routes our outputs by it
        self._ctx: zmq.asyncio.Context | None = None
        self._input: AsyncDealerQueue | None = None
        self._output: AsyncDealerQueue | None = None
        self._requests = OpenRequests()
        self._pings: dict[int, asyncio.Future[Pong]] = {}
        self._ping_ids = itertools.count()
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # ----- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect both sockets and start the receive, send and keepalive tasks (returns at once)."""
        self._ctx = zmq.asyncio.Context()
        self._input = AsyncDealerQueue(self._ctx, self.input_addr, EngineMessage, FrontendMessage, self._identity, self.security)
        self._output = AsyncDealerQueue(self._ctx, self.output_addr, EngineMessage, FrontendMessage, self._identity, self.security)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="engine-recv"),
            asyncio.create_task(self._send_loop(), name="engine-send"),
            asyncio.create_task(self._keepalive_loop(), name="engine-keepalive"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        """A background task ended outside close(): this process cannot talk to the engine any
        more, so it exits for its supervisor to restart it (never half-dead behind /version)."""
        if self._closed:
            return
        error = None if task.cancelled() else task.exception()
        log.critical("the %s task ended (%r); exiting", task.get_name(), error or "cancelled")
        logging.shutdown()
        os._exit(70)  # EX_SOFTWARE

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """The engine's ModelInfo, once it has answered our Hello (raises TimeoutError)."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.model_info is not None
        return self.model_info

    async def drain(self, timeout: float) -> None:
        """Take no new requests and let the open ones finish for up to ``timeout`` seconds; then
        fail those still open (503), so each client gets a final error instead of a cut stream."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while len(self._requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self._requests):
            log.warning("%d request(s) still open at the shutdown deadline: failing them", len(self._requests))
            self._requests.fail_all(SHUTTING_DOWN, 503)

    async def close(self, linger_ms: int = 500) -> None:
        """Say Goodbye, fail every open request, stop the tasks and close the sockets."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._requests.fail_all(SHUTTING_DOWN, 503)
        self._requests = OpenRequests()
        if self._input is not None:
            with contextlib.suppress(Exception):
                # Ask the engine to drop what we leave behind (it may be gone already: wait little).
                await asyncio.wait_for(self._input.send(Goodbye(self.frontend_id)), 0.5)
            self._input.sock.setsockopt(zmq.LINGER, linger_ms)  # let Goodbye leave the socket
            self._input.close()
        if self._output is not None:
            self._output.close()
        if self._ctx is not None:
            self._ctx.term()

    # ----- requests -----------------------------------------------------------------------------

    @property
    def open_requests(self) -> int:
        """Requests of this frontend registered and not yet released."""
        return len(self._requests)

    def register(self, req_ids: list[str]) -> asyncio.Queue[StreamItem]:
        """One queue that receives the deltas and failures of all ``req_ids`` (a request's n
        children share it). Call before add_request so no output can arrive unrouted."""
        return self._requests.register(req_ids)

    def release(self, req_ids: list[str]) -> None:
        """Stop routing outputs of these requests; later ones are dropped."""
        self._requests.release(req_ids)

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                    pooling: PoolingParams | None = None, lora_request: LoRARequest | None = None) -> None:
        """Submit a registered request (its outputs go to its queue, also across engine restarts);
        pooling: a pooling request's parameters; lora_request: the adapter it runs with."""
        ids = np.asarray(prompt_token_ids, dtype=np.int32)
        engine_id = self.model_info.engine_id if self.model_info is not None else None
        add = self._requests.submit(req_id, ids, params, priority, engine_id, pooling, lora_request)
        self._outbox.put_nowait(add)

    def abort(self, req_ids: list[str]) -> None:
        """Ask the engine to stop these requests. Synchronous, so safe in finally blocks."""
        wire_ids = self._requests.stop(req_ids)
        if wire_ids and not self._closed:
            self._outbox.put_nowait(AbortRequests(wire_ids))

    async def ping(self, timeout: float) -> Pong | None:
        """A Pong from the engine's step loop, or None if none came within ``timeout``."""
        if self._closed:
            return None
        ping_id = next(self._ping_ids)
        future: asyncio.Future[Pong] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        self._outbox.put_nowait(Ping(ping_id))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._pings.pop(ping_id, None)

    # ----- background tasks ---------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """Hello until the engine answers, then a Ping whose Pong tells a restarted engine apart
        within an interval (its new engine_id starts the resumption); a heartbeat always."""
        while True:
            try:
                self._outbox.put_nowait(FrontendHeartbeat(self.frontend_id))
                if not self._ready.is_set():
                    self._outbox.put_nowait(Hello(self.frontend_id))
                else:
                    self._outbox.put_nowait(Ping(next(self._ping_ids)))
            except Exception:  # never stop the heartbeat
                log.exception("keepalive failed")
            await asyncio.sleep(self.interval)

    async def _send_loop(self) -> None:
        assert self._input is not None
        while True:
            msg = await self._outbox.get()
            if isinstance(msg, _PERIODIC) and not self._input.sock.get(zmq.EVENTS) & zmq.POLLOUT:
                continue  # an engine gone long enough to fill the socket's queue: wait for none of these
            try:
                await self._input.send(msg)
            except Exception as exc:  # noqa: BLE001 (logged there) one message that cannot go fails its request alone
                self._send_failed(msg, exc)

    def _send_failed(self, msg: Any, exc: Exception) -> None:
        log.error("could not send %s to the engine: %s: %s", type(msg).__name__, type(exc).__name__, exc)
        if isinstance(msg, AddRequest):
            if isinstance(exc, _ENCODE_ERRORS):
                self._requests.fail_wire(msg.req_id, f"The request cannot be sent to the engine: {exc}", 400)
            else:
                self._requests.fail_wire(msg.req_id, f"Sending the request to the engine failed: {exc}", 500)

    async def _recv_loop(self) -> None:
        assert self._output is not None
        while True:
            try:
                self._dispatch(await self._output.recv())
            except Exception:  # a bad message (or a socket hiccup) must not stop the dispatcher
                log.exception("failed to receive or dispatch a message from the engine")
                await asyncio.sleep(0.1)  # no busy loop should the error persist

    def _dispatch(self, msg: Any) -> None:
        self.last_heard = time.monotonic()
        if isinstance(msg, Outputs):
            for delta in msg.deltas:
                routed = self._requests.route(delta)
                if routed is not None:
                    routed[0].put_nowait(routed[1])
        elif isinstance(msg, RequestFailed):
            routed = self._requests.route_failure(msg)
            if routed is not None:
                routed[0].put_nowait(routed[1])
        elif isinstance(msg, Pong):
            self.last_pong, self.last_pong_time = msg, time.time()
            if self.model_info is not None and msg.engine_id != self.model_info.engine_id:
                self._outbox.put_nowait(Hello(self.frontend_id))  # a restarted engine: learn it anew
            future = self._pings.get(msg.ping_id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, ModelInfo):
            self._learn(msg)

    def _learn(self, info: ModelInfo) -> None:
        """The engine's ModelInfo; from a new engine instance, resubmit what the old one lost."""
        previous = self.model_info
        if previous is None or info.engine_id != previous.engine_id:
            log.info("engine %s ready: model %s, max_model_len %d", info.engine_id, info.model_name, info.max_model_len)
        self.model_info = info
        self._ready.set()
        if previous is not None and info.engine_id != previous.engine_id:
            stale, adds = self._requests.resume_on(info.engine_id)
            if stale:
                self._outbox.put_nowait(AbortRequests(stale))
            for add in adds:
                self._outbox.put_nowait(add)
            if adds:
                log.warning("engine restarted: resuming %d request(s) on engine %s", len(adds), info.engine_id)
