"""The frontend's connection to the engine: two DEALER sockets with one identity.

Requests go out on the engine's input ROUTER; outputs, failures, pongs and model info come back
on its output ROUTER, which routes them by our identity. A background task dispatches what
arrives: deltas and failures to the per-request queue the caller registered, pongs to the ping
that is waiting for them, model info to whoever awaits readiness. Every send goes through one
outbox drained by one task, so callers can abort synchronously (also from a cancelled task or a
``finally``) and messages leave in the order they were queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from shared.auth import CurveClient
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT
from shared.protocol import (
    AbortRequests,
    AddRequest,
    EngineMessage,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    RequestDelta,
    RequestFailed,
)
from shared.sampling_params import SamplingParams
from shared.transport import AsyncDealerQueue

log = logging.getLogger(__name__)


# What a request's queue yields: the engine's deltas, or the engine's refusal.
StreamItem = RequestDelta | RequestFailed


class EngineClient:
    """Async client of the engine for one frontend process.

    Lifecycle: ``await start()`` (sends Hello every ``hello_interval`` seconds until the engine
    answers with ModelInfo), ``await wait_ready()`` for the ModelInfo, then per request
    ``register`` / ``add_request`` / ``abort`` / ``release``; ``await close()`` says Goodbye.
    """

    def __init__(
        self,
        input_addr: str = DEFAULT_ENGINE_INPUT,
        output_addr: str = DEFAULT_ENGINE_OUTPUT,
        frontend_id: str | None = None,
        security: CurveClient | None = None,
        hello_interval: float = 1.0,
    ):
        self.frontend_id = frontend_id or uuid.uuid4().hex
        self.input_addr, self.output_addr = input_addr, output_addr
        self.security = security  # CURVE settings of both sockets (shared.auth); None: plain
        self.hello_interval = hello_interval
        self.model_info: ModelInfo | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._input: AsyncDealerQueue | None = None
        self._output: AsyncDealerQueue | None = None
        self._streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self._pings: dict[int, asyncio.Future[Pong]] = {}
        self._ping_ids = itertools.count()
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # ----- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect both sockets and start the receive, send and hello tasks (returns at once)."""
        identity = self.frontend_id.encode()
        self._ctx = zmq.asyncio.Context()
        self._input = AsyncDealerQueue(self._ctx, self.input_addr, EngineMessage, FrontendMessage, identity, self.security)
        self._output = AsyncDealerQueue(self._ctx, self.output_addr, EngineMessage, FrontendMessage, identity, self.security)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="engine-recv"),
            asyncio.create_task(self._send_loop(), name="engine-send"),
            asyncio.create_task(self._hello_loop(), name="engine-hello"),
        ]

    @property
    def ready(self) -> bool:
        return self.model_info is not None

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """The engine's ModelInfo, once it has answered our Hello (raises TimeoutError)."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.model_info is not None
        return self.model_info

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
        for queue in self._streams.values():
            queue.put_nowait(RequestFailed("", "the frontend is shutting down", status=503))
        self._streams.clear()
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

    def register(self, req_ids: list[str]) -> asyncio.Queue[StreamItem]:
        """One queue that receives the deltas and failures of all ``req_ids`` (a request's n
        children share it). Call before add_request so no output can arrive unrouted."""
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        for req_id in req_ids:
            if req_id in self._streams:
                raise ValueError(f"request id {req_id!r} is already registered")
            self._streams[req_id] = queue
        return queue

    def release(self, req_ids: list[str]) -> None:
        """Stop routing outputs of these requests; later ones are dropped."""
        for req_id in req_ids:
            self._streams.pop(req_id, None)

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        ids = np.asarray(prompt_token_ids, dtype=np.int32)
        self._outbox.put_nowait(AddRequest(req_id, ids, params))

    def abort(self, req_ids: list[str]) -> None:
        """Ask the engine to stop these requests. Synchronous, so safe in finally blocks."""
        if req_ids and not self._closed:
            self._outbox.put_nowait(AbortRequests(list(req_ids)))

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

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    # ----- background tasks ---------------------------------------------------------------------

    async def _hello_loop(self) -> None:
        while not self._ready.is_set():
            self._outbox.put_nowait(Hello(self.frontend_id))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), self.hello_interval)

    async def _send_loop(self) -> None:
        assert self._input is not None
        while True:
            msg = await self._outbox.get()
            try:
                await self._input.send(msg)
            except zmq.ZMQError as exc:
                log.error("could not send %s to the engine: %s", type(msg).__name__, exc)

    async def _recv_loop(self) -> None:
        assert self._output is not None
        while True:
            msg = await self._output.recv()
            try:
                self._dispatch(msg)
            except Exception:  # a bad message must not stop the dispatcher
                log.exception("failed to dispatch %s from the engine", type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, Outputs):
            for delta in msg.deltas:
                queue = self._streams.get(delta.req_id)
                if queue is not None:
                    queue.put_nowait(delta)
        elif isinstance(msg, RequestFailed):
            queue = self._streams.get(msg.req_id)
            if queue is not None:
                queue.put_nowait(msg)
        elif isinstance(msg, Pong):
            if self.model_info is not None and msg.engine_id != self.model_info.engine_id:
                self._outbox.put_nowait(Hello(self.frontend_id))  # a restarted engine: learn it anew
            future = self._pings.get(msg.ping_id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, ModelInfo):
            if self.model_info is None or msg.engine_id != self.model_info.engine_id:
                log.info("engine %s ready: model %s, max_model_len %d", msg.engine_id, msg.model_name, msg.max_model_len)
            self.model_info = msg
            self._ready.set()
