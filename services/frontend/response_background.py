"""Background responses (background: true). POST answers "queued" at once and the response runs
on as a task: GET reads its progress from the store, POST /v1/responses/{id}/cancel stops it (its
engine requests aborted, the output so far kept), and its stream events are kept so that a
stream (the POST's own, or GET ?stream=true&starting_after=N) can join at any point and leave
without stopping it. A client that goes away never stops a background response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from services.frontend.errors import APIError
from services.frontend.generation import ClientDisconnected
from services.frontend.response_store import UNFINISHED, ResponseStore

if TYPE_CHECKING:
    from services.frontend.responses import ResponseRun

__all__ = ["UNFINISHED", "BackgroundResponses"]
log = logging.getLogger(__name__)


class _Task:
    """One background response: the task that runs it and the events it has made so far."""

    def __init__(self, run: ResponseRun):
        self.run = run
        self.events: list[bytes] = []  # event i has sequence_number i
        self.done = False
        self.cancel_requested = False
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._drive())

    async def _drive(self) -> None:
        run = self.run
        try:
            if self.cancel_requested:  # cancelled before it started: nothing reaches the engine
                raise ClientDisconnected()
            run.gen.start()
            run.save(run.writer.snapshot("in_progress"))
            async for event in run.events(run.gen.updates()):
                self._append(event)
        except ClientDisconnected:  # cancelled: the engine requests were aborted
            run.finish("cancelled")
        except Exception as exc:
            if not isinstance(exc, APIError):
                log.exception("background response failed")
                exc = APIError(500, f"Internal server error: {type(exc).__name__}")
            run.gen.fail()
            error = exc.body()["error"]
            response = run.finish("failed", {"code": error.get("code") or error["type"], "message": error["message"]})
            self._append(run.writer.event("response.failed", response=response))
        finally:
            run.gen.close()
            self.done = True
            self._wake.set()

    def _append(self, event: bytes) -> None:
        self.events.append(event)
        self._wake.set()

    def cancel(self) -> None:
        self.cancel_requested = True
        self.run.gen.cancel()

    async def tail(self, starting_after: int) -> AsyncIterator[bytes]:
        """The events after sequence number ``starting_after``, then each as it is made, until the
        response ends."""
        i = max(starting_after + 1, 0)
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            self._wake.clear()  # no await since the length was read: no event can be missed
            await self._wake.wait()


class BackgroundResponses:
    """The background responses of one frontend, kept while the store holds them."""

    def __init__(self, store: ResponseStore):
        self.store = store
        self._tasks: dict[str, _Task] = {}

    def start(self, run: ResponseRun) -> dict[str, Any]:
        """Store the response as queued, run it as a task; the queued Response object."""
        for rid in [rid for rid, t in self._tasks.items() if t.done and rid not in self.store]:
            del self._tasks[rid]
        queued = run.writer.snapshot("queued")
        run.save(queued)
        self._tasks[queued["id"]] = _Task(run)
        return queued

    def stream(self, response_id: str, starting_after: int = -1) -> AsyncIterator[bytes] | None:
        """The response's events after ``starting_after``, or None when it is not a background
        response held here."""
        task = self._tasks.get(response_id)
        return None if task is None else task.tail(starting_after)

    async def cancel(self, response_id: str) -> bool:
        """Stop the response if it is still running (its output so far is kept as "cancelled");
        False when it is not a background response held here."""
        task = self._tasks.get(response_id)
        if task is None:
            return False
        if not task.done:
            task.cancel()
            await asyncio.wait([task.task])
        return True
