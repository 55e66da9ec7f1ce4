"""The worker's link to the engine: (re)introductions, the engine's start-afresh orders, and
the step loop that executes plans in order and answers each one.

Plans arrive in order on one DEALER socket and run one after another; with async scheduling the
engine sends the next plan before it has read the previous result, so a plan may already wait
when a step ends. The result rank (the last pipeline stage's first tensor-parallel rank) sends the results; any
rank reports a step that failed; a rank whose process group broke (a peer died or stopped past
--dist-timeout) exits instead, so its supervisor starts the group anew.
"""

from __future__ import annotations

import logging
import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from services.worker.distributed import group_failed
from services.worker.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from shared.protocol import Shutdown, StepPlan, WorkerAccepted, WorkerFailed, WorkerReady
from shared.transport import DealerQueue

log = logging.getLogger("pagedserve.worker")


class EngineLink:
    """The worker's connection to the engine. Each time the connection is (re)established — the
    engine started, or came back after a restart — the worker introduces itself with WorkerReady.
    The engine answers WorkerAccepted(engine id, epoch), and sends a new epoch whenever it starts
    the workers afresh; the worker drops its request state whenever the pair changes (a new
    engine, or the same engine after it recomputed every request)."""

    def __init__(self, queue: DealerQueue, ready: WorkerReady, runner: ModelRunner):
        if queue.monitor is None:
            raise ValueError("EngineLink needs a DealerQueue created with monitor=zmq.EVENT_HANDSHAKE_SUCCEEDED")
        self.queue, self.ready, self.runner = queue, ready, runner
        self.accepted: tuple[str, int] | None = None
        self.poller = zmq.Poller()
        self.poller.register(queue.sock, zmq.POLLIN)
        self.poller.register(queue.monitor, zmq.POLLIN)

    def recv(self, timeout_ms: int):
        events = dict(self.poller.poll(timeout_ms))
        if self.queue.monitor in events:
            recv_monitor_message(self.queue.monitor)
            self.queue.send(self.ready)
            log.info("connected to the engine; sent WorkerReady")
        if self.queue.sock not in events:
            return None
        msg = self.queue.recv(timeout_ms=0)
        if isinstance(msg, WorkerAccepted):
            accepted = (msg.engine_id, msg.epoch)
            if accepted != self.accepted:
                if self.accepted is not None:
                    log.info("engine %s epoch %d: dropping the request state held so far", *accepted)
                self.runner.reset()
                self.accepted = accepted
            return None
        return msg

    def send(self, msg) -> None:
        self.queue.send(msg)


def serve(runner: ModelRunner, queue: EngineLink, rank: int, metrics: WorkerMetrics) -> int:
    """Execute plans until the engine says to stop; returns the process exit status. Each
    result carries the step's timeline: when the plan was taken, the wait for it since the
    previous step ended, and the compute time."""
    idle_since = time.perf_counter()
    while True:
        msg = queue.recv(timeout_ms=1000)
        if msg is None:
            continue
        if isinstance(msg, Shutdown):
            (log.error if msg.rejected else log.info)("shutdown: %s", msg.reason)
            return 1 if msg.rejected else 0
        if not isinstance(msg, StepPlan):
            continue
        received_at, start, waited = time.time(), time.perf_counter(), runner.stage_wait_s
        try:
            result = runner.execute(msg)
        except Exception as exc:  # report, keep the process alive for the engine to decide
            log.exception("step %d failed", msg.step_id)
            if group_failed(exc):  # no step can run here any more: exit, so the group starts anew
                log.error("the ranks' process group failed; exiting so the supervisor restarts the group")
                logging.shutdown()
                os._exit(1)
            queue.send(WorkerFailed(rank, msg.step_id, f"{type(exc).__name__}: {exc}"))
            idle_since = time.perf_counter()
            continue
        result.received_at, result.idle_s = received_at, start - idle_since
        idle_since = time.perf_counter()
        result.compute_s = idle_since - start
        if runner.answers:
            queue.send(result)
        # busy: the step's compute, less the time it sat receiving from other pipeline stages
        metrics.observe(runner.last_stats, len(result.failed), result.compute_s - (runner.stage_wait_s - waited))
