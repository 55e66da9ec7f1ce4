"""The engine's frontend sockets: two ROUTERs, each owned by a thread of its own.

The input thread receives and decodes frontend messages into `inbox`; the output thread encodes
and sends what the core loop puts in `outbox` (identity, message). A malformed or undeliverable
message is logged and dropped; the threads run until `stopping` is set.
"""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from shared.auth import Security
from shared.protocol import EngineMessage, FrontendMessage
from shared.transport import RouterQueue

log = logging.getLogger("pagedserve.engine")


class FrontendIO:
    def __init__(
        self, ctx: zmq.Context, input_addr: str, output_addr: str, stopping: threading.Event,
        security: Security | None = None,
    ):
        self.ctx, self.input_addr, self.output_addr = ctx, input_addr, output_addr
        self.stopping, self.security = stopping, security
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()

    def start(self) -> None:
        """Bind both sockets, then start their threads. Bound here, so an address that cannot be
        bound stops the process now instead of leaving an engine up without its input; each
        socket then belongs to its thread alone."""
        for target, addr in ((self._input_loop, self.input_addr), (self._output_loop, self.output_addr)):
            q = RouterQueue(self.ctx, addr, FrontendMessage, EngineMessage, security=self.security)
            threading.Thread(target=target, args=(q,), daemon=True, name=target.__name__).start()

    def _input_loop(self, q: RouterQueue) -> None:
        while not self.stopping.is_set():
            try:
                got = q.recv(timeout_ms=200)
            except Exception:  # malformed messages are dropped in recv; anything else is logged here
                log.exception("input: dropped a message")
                continue
            if got is not None:
                self.inbox.put(got)
        q.close()

    def _output_loop(self, q: RouterQueue) -> None:
        while not self.stopping.is_set():
            try:
                identity, msg = self.outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                q.send(identity, msg)
            except Exception:
                log.exception("output: dropped a %s to %r", type(msg).__name__, identity)
        q.close()

