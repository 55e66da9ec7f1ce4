"""The engine's side of the worker processes: handshake, step execution, liveness.

Every rank connects a DEALER to the engine's worker ROUTER and introduces itself with WorkerReady
(its KV capacity) whenever its connection is (re)established; a thread of each worker sends a
WorkerHeartbeat every HEARTBEAT_INTERVAL_S, during steps too. A rank is lost when it stays
silent for `timeout_s`; a WorkerReady after start-up (a new connection) or a heartbeat from a
lost rank (it hung and came back) means a rank re-joined, whose KV cache and request state can
no longer be trusted. Either way the group turns `stale`: once every rank is back the engine
restarts the workers' state (every request recomputed from its tokens so far), and the epoch in
WorkerAccepted tells each worker to drop what it held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from shared.auth import Security
from shared.config import EngineConfig
from shared.protocol import (
    EngineToWorker,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerAccepted,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.transport import RouterQueue

log = logging.getLogger("pagedserve.engine")


class WorkerError(RuntimeError):
    """A worker reported that a step failed; the process is alive and keeps its state."""


class WorkerLost(RuntimeError):
    """A rank died, hung or re-joined while a step ran: the step's result will never come."""


@dataclass
class StepTimes:
    """The engine's wall-clock times of one step: plan sent, waiting for it began, result read."""

    sent: float
    waiting: float = 0.0
    got: float = 0.0


class WorkerGroup:
    """The engine core's pipeline: sends each plan to every rank, returns the result rank's
    (the last pipeline stage's first tensor-parallel rank) result. With
    async scheduling a second plan is sent before the first one's result is read; each rank
    runs plans in order, and answers are kept by step id until collected."""

    def __init__(
        self, ctx: zmq.Context, addr: str, config: EngineConfig, engine_id: str, timeout_s: float = 30.0,
        security: Security | None = None,
    ):
        self.queue = RouterQueue(ctx, addr, WorkerToEngine, EngineToWorker, security=security)
        self.world_size = config.parallel.world_size
        self.result_rank = config.parallel.result_rank  # the last pipeline stage answers
        self.block_size, self.max_model_len = config.cache.block_size, config.model.max_model_len
        self.engine_id = engine_id
        self.timeout_s = timeout_s
        self.ranks: dict[int, bytes] = {}  # connected, live ranks -> their identity
        self.identities: dict[int, bytes] = {}  # every rank that ever reported, lost ones too
        self.reports: dict[int, WorkerReady] = {}
        self.last_seen: dict[int, float] = {}
        self.epoch = 0
        self.started = False
        self.stale = False  # the workers' state no longer matches the engine's
        self.wait_time = 0.0  # seconds the engine spent idle, waiting for results
        self.in_flight: dict[int, StepTimes] = {}  # step id -> when it was sent
        self.answers: dict[int, StepResult | WorkerFailed] = {}  # answers not collected yet
        self.last_times: StepTimes | None = None  # of the latest step collected
        # called while collect() waits for a result: the engine answers Pings meanwhile (loop.py)
        self.on_wait: Callable[[], None] = lambda: None

    @property
    def complete(self) -> bool:
        return len(self.ranks) == self.world_size

    def num_blocks(self) -> int:
        """The KV capacity every rank can hold: the smallest pool wins."""
        return min(self.reports[rank].num_blocks for rank in self.ranks)

    def handshake(self, timeout_s: float, stopping: threading.Event | None = None) -> int | None:
        """Wait until every rank has reported; returns the group's KV capacity in blocks, or None
        as soon as `stopping` is set (the engine was told to stop while it waited)."""
        deadline = time.monotonic() + timeout_s
        while not self.complete:
            if stopping is not None and stopping.is_set():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"only {len(self.ranks)} of {self.world_size} workers reported in {timeout_s:.0f}s")
            got = self.queue.recv(timeout_ms=max(1, int(min(left, 0.2) * 1000)))
            if got is not None:
                self._control(*got)
        self.started = True
        return self.num_blocks()

    def poll(self) -> None:
        """Between steps: take in re-joining ranks and heartbeats, and drop silent ranks."""
        while (got := self.queue.recv(timeout_ms=0)) is not None:
            self._take(*got)
        self._drop_silent()

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect(plan)

    def submit(self, plan: StepPlan) -> None:
        """Send a plan to every rank; its answer is read by collect(plan), in submission order."""
        if not self.complete:
            raise WorkerLost(f"{self.world_size - len(self.ranks)} worker rank(s) missing")
        for identity in self.ranks.values():
            self.queue.send(identity, plan)
        self.in_flight[plan.step_id] = StepTimes(sent=time.time())

    def collect(self, plan: StepPlan) -> StepResult:
        """The result rank's answer to a submitted plan (WorkerError when a rank reports it failed,
        WorkerLost when a rank is lost or re-joins before it comes)."""
        times = self.in_flight.get(plan.step_id)
        if times is None:
            raise WorkerLost("the workers started afresh since the step was sent")
        start, times.waiting = time.monotonic(), time.time()
        while (msg := self.answers.pop(plan.step_id, None)) is None:
            self.on_wait()
            got = self.queue.recv(timeout_ms=200)
            if got is not None:
                self._take(*got)
                if plan.step_id not in self.in_flight:
                    raise WorkerLost("a worker rank re-joined during the step")
            elif self._drop_silent():
                raise WorkerLost("a worker rank went silent during the step")
        del self.in_flight[plan.step_id]
        self.wait_time += time.monotonic() - start
        if isinstance(msg, WorkerFailed):
            raise WorkerError(f"worker rank {msg.rank} failed step {msg.step_id}: {msg.message}")
        times.got = time.time()
        self.last_times = times
        return msg

    def _take(self, identity: bytes, msg) -> None:
        """Keep the answer to a step in flight (the first failure or the result rank's result); hand
        anything else to the control handling."""
        if not isinstance(msg, (StepResult, WorkerFailed)):
            self._control(identity, msg)
        elif self._of_step(identity, msg) and not isinstance(self.answers.get(msg.step_id), WorkerFailed):
            self.answers[msg.step_id] = msg

    def _of_step(self, identity: bytes, msg: StepResult | WorkerFailed) -> bool:
        """True when msg answers a step in flight and comes from the registered identity of its
        rank (results come from the result rank); anything else is stale or forged, and ignored."""
        rank = msg.rank if isinstance(msg, WorkerFailed) else self.result_rank
        if msg.step_id in self.in_flight and self.ranks.get(rank) == identity:
            return True
        log.warning(
            "ignored a %s for step %d from %r as rank %d (steps in flight: %s)",
            type(msg).__name__, msg.step_id, identity, rank, sorted(self.in_flight),
        )
        return False

    def _control(self, identity: bytes, msg) -> None:
        try:
            self._control_one(identity, msg)
        except Exception:  # one bad message never stops the engine
            log.exception("dropped a %s from worker %r", type(msg).__name__, identity)

    def _control_one(self, identity: bytes, msg) -> None:
        if isinstance(msg, WorkerHeartbeat):  # from the rank's heartbeat socket, not its identity
            known = self.reports.get(msg.rank)
            if msg.rank not in self.ranks and known is not None and known.instance_id == msg.instance_id:
                # counted as lost while it hung, alive again on the same connection (a new
                # process introduces itself with WorkerReady instead)
                log.warning("worker rank %d is alive again: every rank starts afresh", msg.rank)
                self.ranks[msg.rank] = self.identities[msg.rank]
                self._new_epoch()
            if msg.rank in self.ranks and known.instance_id == msg.instance_id:
                self.last_seen[msg.rank] = time.monotonic()
            return
        if not isinstance(msg, WorkerReady):
            return
        holder = next((r for r, i in self.ranks.items() if i == identity and r != msg.rank), None)
        if self.ranks.get(msg.rank, identity) != identity or holder is not None:
            log.warning(
                "ignored a WorkerReady for rank %d from %r: that rank or identity is connected and alive",
                msg.rank, identity,
            )
            return
        mismatch = self._mismatch(msg)
        if mismatch is not None:
            log.error("rejected a worker (rank %d): %s", msg.rank, mismatch)
            self.queue.send(identity, Shutdown(f"the engine rejected this worker: {mismatch}", rejected=True))
            return
        self.ranks[msg.rank] = self.identities[msg.rank] = identity
        self.reports[msg.rank] = msg
        self.last_seen[msg.rank] = time.monotonic()
        if not self.started:
            log.info("worker rank %d ready: %d KV blocks", msg.rank, msg.num_blocks)
            self.queue.send(identity, WorkerAccepted(self.engine_id, self.epoch))
            return
        log.warning("worker rank %d (re)joined with %d KV blocks: every rank starts afresh", msg.rank, msg.num_blocks)
        self._new_epoch()

    def _mismatch(self, msg: WorkerReady) -> str | None:
        """Why a worker cannot serve this engine's plans; None when its settings match."""
        if msg.world_size != self.world_size or not 0 <= msg.rank < self.world_size:
            return f"rank {msg.rank} of {msg.world_size}, but the engine runs {self.world_size} rank(s)"
        for name, ours in (("block_size", self.block_size), ("max_model_len", self.max_model_len)):
            if getattr(msg, name) != ours:
                return f"{name} {getattr(msg, name)} differs from the engine's {ours}"
        return None

    def _drop_silent(self) -> bool:
        now = time.monotonic()
        silent = [r for r in self.ranks if now - self.last_seen.get(r, now) > self.timeout_s]
        for rank in silent:
            log.error("worker rank %d silent for %.0fs: counted as lost", rank, now - self.last_seen[rank])
            del self.ranks[rank]
        if silent:
            self._new_epoch()
        return bool(silent)

    def _new_epoch(self) -> None:
        """The workers must drop their request state: tell every connected rank."""
        self.epoch += 1
        self.stale = True
        self.in_flight.clear()  # their answers will never come
        self.answers.clear()
        for identity in self.ranks.values():
            self.queue.send(identity, WorkerAccepted(self.engine_id, self.epoch))

    def shutdown(self) -> None:
        for identity in self.ranks.values():
            self.queue.send(identity, Shutdown("engine stopping"))
