"""One HTTP request's generation: its prompts fanned out into engine requests (n per prompt) by
the request processor, driven by the engine's deltas through its Sequences, as offline.

Everything that must stop an engine request is handled here: a stop string the engine could not
check (Sequence.add says so), the client going away (a watcher on the ASGI receive channel), an error, or the handler
simply returning early. The engine is never left generating for nobody.

An engine that goes silent is given ``resume_timeout`` seconds to come back: a restarted one gets
the requests again from the EngineClient (after the tokens they have), so the client sees one
uninterrupted response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.frontend.engine_client import EngineClient
from services.frontend.errors import APIError, engine_unavailable
from services.frontend.request_metrics import RequestMetrics
from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.processor.outcome import Usage, request_finish_reason, usage
from shared.processor.processor import RequestProcessor
from shared.processor.sequence import Sequence
from shared.protocol import RequestDelta, RequestFailed
from shared.sampling_params import SamplingParams

log = logging.getLogger(__name__)
Receive = Callable[[], Awaitable[dict[str, Any]]]
_CANCELLED = object()


class ClientDisconnected(Exception):
    """The HTTP client went away; the engine requests have been aborted."""


class Generation:
    """Sequences of one request, in choice order (prompt i, sample j -> index i * n + j).

    ``start`` sends the AddRequests; ``close`` (always call it; once counts) aborts whatever has
    not finished, stops routing its outputs and records the request in its metrics. Call ``fail``
    first when the request failed after ``start`` (its finish reason is then "error").
    """

    _counter = itertools.count()

    def __init__(
        self,
        client: EngineClient,
        processor: RequestProcessor,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        stall_timeout: float = 10.0,
        ping_timeout: float = 5.0,
        resume_timeout: float = 30.0,
        metrics: RequestMetrics | None = None,
        priority: int = 0,
        pooling: list[PoolingParams] | None = None,
        lora_request: LoRARequest | None = None,
    ):
        self.client = client
        self.prompts = prompts
        self.params = params
        self.stall_timeout, self.ping_timeout = stall_timeout, ping_timeout
        self.resume_timeout = resume_timeout
        self.priority = priority  # the engine's scheduling priority (lower runs first)
        self.pooling = pooling  # pooling requests: one PoolingParams per prompt
        self.lora_request = lora_request  # the adapter the request's `model` names
        self.metrics = metrics
        base = f"{client.request_prefix}-{next(self._counter)}"  # unique across frontends
        self.sequences = {seq.req_id: seq for seq in processor.sequences(base, prompts, params)}
        self._queue: asyncio.Queue | None = None
        self._watcher: asyncio.Task | None = None
        self.cancelled = False
        self.failed = False
        self._closed = False

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self, receive: Receive | None = None) -> None:
        """Send the requests; with ``receive`` (the ASGI channel), abort them if the client leaves.
        Raises APIError 503 while the frontend drains for shutdown."""
        if self.client.draining:
            raise engine_unavailable("The frontend is shutting down; try another or retry shortly.")
        if self.metrics is not None:
            self.metrics.start()
        self._queue = self.client.register(list(self.sequences))
        for req_id, seq in self.sequences.items():
            pooling = self.pooling[seq.prompt_index] if self.pooling else None
            self.client.add_request(req_id, seq.prompt_token_ids, seq.params, self.priority, pooling,
                                    self.lora_request)
        if receive is not None:
            self._watcher = asyncio.create_task(self._watch_disconnect(receive))

    def fail(self) -> None:
        self.failed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        self.client.abort(self.unfinished())
        self.client.release(list(self.sequences))
        if self.metrics is not None:
            seqs = self.ordered()
            reason = request_finish_reason([s.finish_reason for s in seqs], self.failed)
            self.metrics.finish(reason, self.usage().prompt_tokens, [len(s.token_ids) for s in seqs])

    def cancel(self) -> None:
        """Abort every unfinished sequence and wake the consumer with ClientDisconnected."""
        if not self.cancelled:
            self.cancelled = True
            self.client.abort(self.unfinished())
            if self._queue is not None:
                self._queue.put_nowait(_CANCELLED)

    async def _watch_disconnect(self, receive: Receive) -> None:
        try:
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    self.cancel()
                    return
        except asyncio.CancelledError:
            pass  # the response is done
        except Exception:  # the server's channel failed: nothing to watch, the request goes on
            log.debug("disconnect watcher stopped", exc_info=True)

    # ----- consuming ----------------------------------------------------------------------------

    def unfinished(self) -> list[str]:
        return [rid for rid, seq in self.sequences.items() if not seq.finished]

    def ordered(self) -> list[Sequence]:
        return sorted(self.sequences.values(), key=lambda s: s.index)

    def usage(self) -> Usage:
        return usage(self.prompts, list(self.sequences.values()))

    async def updates(self) -> AsyncIterator[Sequence]:
        """Each sequence as an engine delta changes it, until all have finished. Raises APIError
        (the engine refused the request, failed, or stopped answering) or ClientDisconnected."""
        while self.unfinished():
            item = await self._next()
            if item is _CANCELLED:
                raise ClientDisconnected()
            if isinstance(item, RequestFailed):
                raise APIError(item.status, item.message, param=item.param,
                               code="engine_rejected" if item.status < 500 else None)
            seq = self.sequences[item.req_id]
            if seq.finished:
                continue  # e.g. the engine's abort notice after a stop string
            before = len(seq.token_ids)
            if seq.add(item):
                self.client.abort([item.req_id])
            if self.metrics is not None:
                self.metrics.on_tokens(seq.index, len(seq.token_ids) - before)
            if seq.finish_reason == "error":
                raise APIError(500, "the engine failed while generating this request", code="engine_error")
            yield seq

    async def collect(self) -> list[Sequence]:
        """Run to completion; the sequences in choice order."""
        async for _ in self.updates():
            pass
        return self.ordered()

    async def _next(self) -> RequestDelta | RequestFailed | object:
        """The next engine item. A long silence is fine while the engine answers pings (it may
        be busy with other requests). An engine that does not answer has ``resume_timeout``
        seconds to come back before the request fails with 503."""
        assert self._queue is not None, "start() first"
        if not self._queue.empty():  # the common case under load: no timer to arm
            return self._queue.get_nowait()
        silent_since: float | None = None
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), self.stall_timeout)
            except asyncio.TimeoutError:
                if self.cancelled:
                    return _CANCELLED
            info = self.client.model_info
            known = info.engine_id if info is not None else None  # holds our requests, as far as we know
            pong = await self.client.ping(self.ping_timeout)
            if pong is None:
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= self.resume_timeout:
                    raise engine_unavailable("The engine stopped responding while serving this request.")
                continue
            silent_since = None
            # The Ping left after every AddRequest for the engine we knew, and its Pong after any
            # output they produced: that engine holding nothing at all has lost ours. (A Pong from
            # another engine: a restart, and the client is resubmitting the requests to it.)
            if pong.engine_id == known and pong.num_running + pong.num_waiting == 0 and self._queue.empty():
                raise engine_unavailable("The engine lost this request.")
