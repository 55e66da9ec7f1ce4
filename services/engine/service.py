"""The engine process: scheduler + KV block manager, frontends on ROUTER sockets, workers behind.

Threads: one receives and decodes frontend messages, one encodes and sends outputs, and the core
loop schedules steps and exchanges plans and results with the workers. While the workers compute
a step the input thread keeps taking requests and aborts, which the next loop turn applies.
No torch here.
"""

from __future__ import annotations

import argparse
import logging
import queue
import random
import signal
import threading
import time
import uuid

import zmq

from services.engine.core import EngineCore
from services.engine.frontends import FrontendHandler, Frontends
from services.engine.metrics import EngineMetrics
from services.engine.timeline import step_timeline
from services.engine.workers import WorkerError, WorkerGroup, WorkerLost
from shared.auth import EngineAuth, add_auth_args, engine_security
from shared.config import EngineConfig
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT, DEFAULT_WORKER_ADDR, add_flag
from shared.metrics import serve_metrics
from shared.protocol import EngineMessage, FrontendMessage, ModelInfo, Ping, Pong
from shared.transport import RouterQueue

log = logging.getLogger("pagedserve.engine")


class EngineService:
    def __init__(
        self, config: EngineConfig, input_addr: str, output_addr: str, worker_addr: str, worker_timeout_s: float = 30.0,
        auth: EngineAuth | None = None, frontend_timeout_s: float = 10.0,
    ):
        self.config = config
        self.frontend_table = Frontends(frontend_timeout_s)  # a bad timeout fails before any socket binds
        self.ctx = zmq.Context()
        self.input_addr, self.output_addr = input_addr, output_addr
        self.frontend_security = auth.frontends if auth else None
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.engine_id = uuid.uuid4().hex
        self.workers = WorkerGroup(
            self.ctx, worker_addr, config, self.engine_id, worker_timeout_s, auth.workers if auth else None
        )
        self.stopping = threading.Event()
        self.core: EngineCore | None = None
        self.frontends: FrontendHandler | None = None
        self.metrics = EngineMetrics(config.model.name)

    # ----- I/O threads ------------------------------------------------------------------------

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

    # ----- core loop --------------------------------------------------------------------------

    def start(self, handshake_timeout_s: float = 600.0) -> None:
        # Bound here, so an address that cannot be bound stops the process now instead of leaving
        # an engine up without its input; each socket then belongs to its thread alone.
        for target, addr in ((self._input_loop, self.input_addr), (self._output_loop, self.output_addr)):
            q = RouterQueue(self.ctx, addr, FrontendMessage, EngineMessage, security=self.frontend_security)
            threading.Thread(target=target, args=(q,), daemon=True, name=target.__name__).start()
        num_blocks = self.workers.handshake(handshake_timeout_s)
        self.metrics.workers.set(len(self.workers.ranks))
        # Step ids start at random, so a result a worker computed for a previous engine instance
        # (still queued on its socket when this one started) can never pass for one of ours.
        self.core = EngineCore(self.config, self.workers, num_blocks, random.getrandbits(48))
        m = self.config.model
        model_info = ModelInfo(
            m.name, m.path, m.max_model_len, m.vocab_size, list(m.eos_token_ids),
            dict(m.generation_defaults), num_blocks, self.config.cache.block_size, self.engine_id,
            self.config.scheduler.max_num_queued_requests,
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
                for identity, ping in pongs:
                    s = self.core.scheduler
                    pong = Pong(ping.ping_id, s.num_running, s.num_waiting, self.engine_id, workers_ready=ready)
                    self.outbox.put((identity, pong))
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
        self.frontends.route(deltas)

    def _take_inputs(self, block: bool) -> list[tuple[bytes, Ping]]:
        pongs = []
        try:
            item = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
        except queue.Empty:
            return pongs
        while item is not None:
            identity, msg = item
            try:
                self.frontends.handle(identity, msg)
            except Exception:  # one message's error drops that message, nothing else
                log.exception("dropped a %s from frontend %r", type(msg).__name__, identity)
            if isinstance(msg, Ping):
                pongs.append((identity, msg))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        return pongs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shared.engine_args import add_model_args

    add_model_args(parser)
    add_flag(parser, "--frontend-input", DEFAULT_ENGINE_INPUT, "ROUTER address frontends send requests to")
    add_flag(parser, "--frontend-output", DEFAULT_ENGINE_OUTPUT, "ROUTER address frontends receive outputs from")
    add_flag(parser, "--worker-addr", DEFAULT_WORKER_ADDR, "ROUTER address workers connect to")
    add_flag(parser, "--worker-timeout", 30.0, "seconds without a worker's heartbeat before it counts as lost")
    add_flag(parser, "--frontend-timeout", 10.0, "seconds without a frontend's message before its requests are aborted")
    add_flag(parser, "--metrics-port", 8001, "port serving /metrics (0: off)")
    add_flag(parser, "--metrics-host", "127.0.0.1", "address serving /metrics (0.0.0.0: every interface)")
    add_auth_args(parser, engine=True)


def run(args: argparse.Namespace) -> int:
    from shared.engine_args import engine_config_from_args

    config = engine_config_from_args(args, weights=False)  # the engine reads no weights
    auth = engine_security(args, [args.frontend_input, args.frontend_output, args.worker_addr])
    service = EngineService(
        config, args.frontend_input, args.frontend_output, args.worker_addr, args.worker_timeout, auth,
        args.frontend_timeout,
    )
    serve_metrics(args.metrics_port, args.metrics_host)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    service.start()
    service.run()
    return 0
