"""The engine's core loop: frontend inputs in, steps through the worker group, outputs out, and
recovery when a worker rank is lost or re-joins.

The frontend sockets run on threads of their own (frontend_io.py): while the workers compute a
step, the input thread keeps taking requests and aborts, which the next loop turn applies. With
async scheduling the next step is planned and sent before the previous result is read (core.py).
No torch here.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid

import zmq

from services.engine.core import EngineCore
from services.engine.frontend_io import FrontendIO
from services.engine.frontends import FrontendHandler, Frontends
from services.engine.metrics import EngineMetrics
from services.engine.stats_log import StatsLogger
from services.engine.timeline import step_timeline
from services.engine.workers import WorkerError, WorkerGroup, WorkerLost
from shared.auth import EngineAuth
from shared.config import EngineConfig
from shared.protocol import AddRequest, ModelInfo, Ping, Pong

log = logging.getLogger("pagedserve.engine")


class EngineService:
    def __init__(
        self, config: EngineConfig, input_addr: str, output_addr: str, worker_addr: str, worker_timeout_s: float = 30.0,
        auth: EngineAuth | None = None, frontend_timeout_s: float = 10.0, log_stats_interval_s: float | None = None,
    ):
        self.config = config
        self.frontend_table = Frontends(frontend_timeout_s)  # a bad timeout fails before any socket binds
        self.ctx = zmq.Context()
        self.stopping = threading.Event()
        self.io = FrontendIO(self.ctx, input_addr, output_addr, self.stopping, auth.frontends if auth else None)
        self.inbox, self.outbox = self.io.inbox, self.io.outbox
        self.engine_id = uuid.uuid4().hex
        self.workers = WorkerGroup(
            self.ctx, worker_addr, config, self.engine_id, worker_timeout_s, auth.workers if auth else None
        )
        self.core: EngineCore | None = None
        self.frontends: FrontendHandler | None = None
        self.metrics = EngineMetrics(config.model.name)
        # vLLM's periodic stats line (stats_log.py); None: --disable-log-stats
        self.stats = StatsLogger(log_stats_interval_s) if log_stats_interval_s is not None else None
        # Frontend messages taken while a step ran (Pings among them answered at once), applied in
        # order once it ends: a step may take minutes on a CPU, and a busy engine is no dead one.
        self.deferred: list[tuple[bytes, object]] = []
        self.workers.on_wait = self._answer_pings

    def start(self, handshake_timeout_s: float = 600.0) -> None:
        self.io.start()
        num_blocks = self.workers.handshake(handshake_timeout_s, self.stopping)
        if num_blocks is None:  # told to stop before every worker reported: run() returns at once
            return
        self.metrics.workers.set(len(self.workers.ranks))
        # Step ids start at random, so a result a worker computed for a previous engine instance
        # (still queued on its socket when this one started) can never pass for one of ours.
        self.core = EngineCore(self.config, self.workers, num_blocks, random.getrandbits(48))
        m = self.config.model
        model_info = ModelInfo(
            m.name, m.path, m.max_model_len, m.vocab_size, list(m.eos_token_ids),
            dict(m.generation_defaults), num_blocks, self.config.cache.block_size, self.engine_id,
            self.config.scheduler.max_num_queued_requests, m.task,
            self.config.lora.max_lora_rank if self.config.lora is not None else 0,
            self.config.lora.max_loras if self.config.lora is not None else 0,
            m.class_labels if m.task == "classify" else [],
        )
        self.frontends = FrontendHandler(self.core, self.metrics, self.outbox, model_info, self.frontend_table)
        log.info("engine ready: %d KV blocks of %d tokens", num_blocks, self.config.cache.block_size)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                ready = self._workers_ready()
                busy = ready and self.core.has_unfinished()  # steps in flight count too
                pongs = self._take_inputs(block=not busy)
                self.frontends.drop_silent()
                if busy:
                    self._step()
                else:
                    self.metrics.update(self.core.scheduler)
                if self.stats is not None:
                    self.stats.maybe_log(self.core.scheduler)
                for identity, ping in pongs:
                    self.outbox.put((identity, self._pong(ping, ready)))
        finally:
            self.workers.shutdown()
            self.stopping.set()

    def _workers_ready(self) -> bool:
        """True when every rank is connected and in step with the scheduler. After a rank was
        lost or re-joined, the first turn with every rank back restarts the workers' state: the
        requests keep their tokens and carry on, recomputed."""
        workers = self.workers
        workers.poll()
        self.metrics.workers.set(len(workers.ranks))
        if not workers.complete:
            return False
        if workers.stale:
            try:
                self.core.restart_workers(workers.num_blocks())
            except ValueError as exc:
                log.error("cannot use the re-joined workers: %s", exc)
                return False
            workers.stale = False
            self.metrics.worker_restarts.inc()
            log.warning(
                "workers back (epoch %d, %d KV blocks): %d request(s) resume by recompute",
                workers.epoch, workers.num_blocks(), len(self.core.scheduler.requests),
            )
        return True

    def _step(self) -> None:
        start, waited = time.monotonic(), self.workers.wait_time
        try:
            deltas = self.core.step()
        except WorkerLost as exc:  # nothing of the step is kept: its requests resume later
            log.error("%s; requests resume once every worker rank is back", exc)
            self.metrics.update(self.core.scheduler)  # the queue times of the requests it started
            return
        except WorkerError as exc:  # a step failed in the worker: fail its requests, keep serving
            log.error("%s", exc)
            self.frontends.fail(self.core.fail_last_step(), f"the model step failed: {exc}", 500)
            return
        duration = time.monotonic() - start
        self.metrics.worker_wait.set_total(self.workers.wait_time)
        self.metrics.plan.observe(self.core.last_plan_s)
        if self.core.last_result is not None:  # a result was read this turn
            self.metrics.observe_timeline(step_timeline(self.workers.last_times, self.core.last_result))
            self.metrics.observe_step(
                self.core.scheduler, self.core.last_num_tokens, duration, self.workers.wait_time - waited
            )
            if self.stats is not None:
                self.stats.record(deltas, self.core.last_num_tokens)
        else:  # a plan made ahead, nothing read yet: its requests' queue times go out now
            self.metrics.update(self.core.scheduler)
        self.frontends.route(deltas)

    def _pong(self, ping: Ping, ready: bool) -> Pong:
        """The engine's state: requests taken but not applied yet count as waiting."""
        s = self.core.scheduler
        taken = sum(isinstance(msg, AddRequest) for _, msg in self.deferred)
        running, waiting = s.adapter_names()
        return Pong(ping.ping_id, s.num_running, s.num_waiting + taken, self.engine_id, ready, s.kv.usage,
                    running, waiting)

    def _answer_pings(self) -> None:
        """While a step runs: take what the frontends sent, answer their Pings now, apply the rest later."""
        while True:
            try:
                identity, msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.deferred.append((identity, msg))
            if isinstance(msg, Ping):
                self.outbox.put((identity, self._pong(msg, ready=True)))

    def _take_inputs(self, block: bool) -> list[tuple[bytes, Ping]]:
        """Apply the frontends' messages: those taken during the last step first, then the inbox's
        (waiting up to 0.2 s for one if `block`). Returns the Pings to answer after this turn."""
        pongs = []
        items, self.deferred = self.deferred, []
        answered = {id(msg) for _, msg in items if isinstance(msg, Ping)}
        if not items:
            try:
                items.append(self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait())
            except queue.Empty:
                return pongs
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for identity, msg in items:
            try:
                self.frontends.handle(identity, msg)
            except Exception:  # one message's error drops that message, nothing else
                log.exception("dropped a %s from frontend %r", type(msg).__name__, identity)
            if isinstance(msg, Ping) and id(msg) not in answered:
                pongs.append((identity, msg))
        return pongs
