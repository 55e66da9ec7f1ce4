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
from services.engine.metrics import EngineMetrics
from shared.config import EngineConfig
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT, DEFAULT_WORKER_ADDR, add_flag
from shared.metrics import serve_metrics
from shared.protocol import (
    AbortRequests,
    AddRequest,
    EngineMessage,
    EngineToWorker,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    RequestDelta,
    RequestFailed,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerAccepted,
    WorkerFailed,
    WorkerReady,
    WorkerToEngine,
)
from shared.transport import RouterQueue

log = logging.getLogger("pagedserve.engine")


class WorkerError(RuntimeError):
    pass


class WorkerGroup:
    """The executor for the engine core: sends each plan to every rank, returns rank 0's result."""

    def __init__(self, ctx: zmq.Context, addr: str, world_size: int, engine_id: str):
        self.queue = RouterQueue(ctx, addr, WorkerToEngine, EngineToWorker)
        self.world_size = world_size
        self.engine_id = engine_id
        self.ranks: dict[int, bytes] = {}
        self.wait_time = 0.0  # seconds the engine spent idle, waiting for results

    def handshake(self, timeout_s: float) -> WorkerReady:
        """Wait until every rank has reported its KV capacity; the smallest pool wins."""
        deadline, reports = time.monotonic() + timeout_s, {}
        while len(reports) < self.world_size:
            left = deadline - time.monotonic()
            got = self.queue.recv(timeout_ms=max(1, int(left * 1000))) if left > 0 else None
            if got is None:
                raise WorkerError(f"only {len(reports)} of {self.world_size} workers reported in {timeout_s:.0f}s")
            identity, msg = got
            if isinstance(msg, WorkerReady):
                self._accept(identity, msg)
                reports[msg.rank] = msg
                log.info("worker rank %d ready: %d KV blocks", msg.rank, msg.num_blocks)
        smallest = min(reports.values(), key=lambda r: r.num_blocks)
        return smallest

    def execute(self, plan: StepPlan) -> StepResult:
        for identity in self.ranks.values():
            self.queue.send(identity, plan)
        start = time.monotonic()
        while True:
            got = self.queue.recv(timeout_ms=1000)
            if got is None:
                continue
            identity, msg = got
            if isinstance(msg, WorkerReady):  # a worker that reconnected: it keeps its state
                self._accept(identity, msg)
            elif isinstance(msg, WorkerFailed):
                raise WorkerError(f"worker rank {msg.rank} failed step {msg.step_id}: {msg.message}")
            if isinstance(msg, StepResult) and msg.step_id == plan.step_id:
                self.wait_time += time.monotonic() - start
                return msg

    def _accept(self, identity: bytes, msg: WorkerReady) -> None:
        self.ranks[msg.rank] = identity
        self.queue.send(identity, WorkerAccepted(self.engine_id))

    def shutdown(self) -> None:
        for identity in self.ranks.values():
            self.queue.send(identity, Shutdown("engine stopping"))


class EngineService:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str, worker_addr: str):
        self.config = config
        self.ctx = zmq.Context()
        self.input_addr, self.output_addr = input_addr, output_addr
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.engine_id = uuid.uuid4().hex
        self.workers = WorkerGroup(self.ctx, worker_addr, config.parallel.tensor_parallel_size, self.engine_id)
        self.stopping = threading.Event()
        self.owners: dict[str, bytes] = {}  # req_id -> frontend identity
        self.frontends: set[bytes] = set()
        self.core: EngineCore | None = None
        self.model_info: ModelInfo | None = None
        self.metrics = EngineMetrics(config.model.name)

    # ----- I/O threads ------------------------------------------------------------------------

    def _input_loop(self) -> None:
        q = RouterQueue(self.ctx, self.input_addr, FrontendMessage, EngineMessage)
        while not self.stopping.is_set():
            got = q.recv(timeout_ms=200)
            if got is not None:
                self.inbox.put(got)
        q.close()

    def _output_loop(self) -> None:
        q = RouterQueue(self.ctx, self.output_addr, FrontendMessage, EngineMessage)
        while not self.stopping.is_set():
            try:
                identity, msg = self.outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            q.send(identity, msg)
        q.close()

    # ----- core loop --------------------------------------------------------------------------

    def start(self, handshake_timeout_s: float = 600.0) -> None:
        for target in (self._input_loop, self._output_loop):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        ready = self.workers.handshake(handshake_timeout_s)
        self.metrics.workers.set(len(self.workers.ranks))
        # Step ids start at random, so a result a worker computed for a previous engine instance
        # (still queued on its socket when this one started) can never pass for one of ours.
        self.core = EngineCore(self.config, self.workers, ready.num_blocks, random.getrandbits(48))
        m = self.config.model
        self.model_info = ModelInfo(
            m.name, m.path, m.max_model_len, m.vocab_size, list(m.eos_token_ids),
            dict(m.generation_defaults), ready.num_blocks, self.config.cache.block_size, self.engine_id,
        )
        log.info("engine ready: %d KV blocks of %d tokens", ready.num_blocks, self.config.cache.block_size)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                busy = self.core.has_unfinished()
                pongs = self._take_inputs(block=not busy)
                if busy:
                    self._step()
                else:
                    self.metrics.update(self.core.scheduler)
                for identity, ping in pongs:
                    s = self.core.scheduler
                    self.outbox.put((identity, Pong(ping.ping_id, s.num_running, s.num_waiting, self.engine_id)))
        finally:
            self.workers.shutdown()
            self.stopping.set()

    def _step(self) -> None:
        start, waited = time.monotonic(), self.workers.wait_time
        try:
            deltas = self.core.step()
        except WorkerError as exc:  # a step failed in the worker: fail its requests, keep serving
            log.error("%s", exc)
            for req_id in self.core.fail_last_step():
                owner = self.owners.pop(req_id, None)
                if owner is not None:
                    self.outbox.put((owner, RequestFailed(req_id, f"the model step failed: {exc}", 500)))
            return
        duration = time.monotonic() - start
        self.metrics.worker_wait.set_total(self.workers.wait_time)
        self.metrics.observe_step(self.core.scheduler, self.core.last_num_tokens, duration, self.workers.wait_time - waited)
        self._route(deltas)

    def _take_inputs(self, block: bool) -> list[tuple[bytes, Ping]]:
        pongs = []
        try:
            item = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
        except queue.Empty:
            return pongs
        while item is not None:
            identity, msg = item
            if isinstance(msg, Ping):
                pongs.append((identity, msg))
            else:
                self._handle(identity, msg)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        return pongs

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, AddRequest):
            try:
                request = self.core.make_request(msg.req_id, msg.prompt_token_ids.tolist(), msg.sampling_params)
                self.core.add_request(request)
            except ValueError as exc:
                self.outbox.put((identity, RequestFailed(msg.req_id, str(exc), 400)))
                return
            self.owners[msg.req_id] = identity
        elif isinstance(msg, AbortRequests):
            self._route(self.core.abort(msg.req_ids))
        elif isinstance(msg, Hello):
            self.frontends.add(identity)
            self.metrics.frontends.set(len(self.frontends))
            self.outbox.put((identity, self.model_info))
        elif isinstance(msg, Goodbye):
            self.frontends.discard(identity)
            self.metrics.frontends.set(len(self.frontends))
            self._route(self.core.abort([r for r, o in self.owners.items() if o == identity]))

    def _route(self, deltas: list[RequestDelta]) -> None:
        by_owner: dict[bytes, list[RequestDelta]] = {}
        for delta in deltas:
            owner = self.owners.get(delta.req_id)
            if owner is None:
                continue
            by_owner.setdefault(owner, []).append(delta)
            if delta.finish_reason is not None:
                del self.owners[delta.req_id]
        for owner, batch in by_owner.items():
            self.outbox.put((owner, Outputs(batch)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shared.engine_args import add_model_args

    add_model_args(parser)
    add_flag(parser, "--frontend-input", DEFAULT_ENGINE_INPUT, "ROUTER address frontends send requests to")
    add_flag(parser, "--frontend-output", DEFAULT_ENGINE_OUTPUT, "ROUTER address frontends receive outputs from")
    add_flag(parser, "--worker-addr", DEFAULT_WORKER_ADDR, "ROUTER address workers connect to")
    add_flag(parser, "--metrics-port", 8001, "port serving /metrics (0: off)")
    add_flag(parser, "--metrics-host", "0.0.0.0", "address serving /metrics")


def run(args: argparse.Namespace) -> int:
    from shared.engine_args import engine_config_from_args

    config = engine_config_from_args(args, weights=False)  # the engine reads no weights
    service = EngineService(config, args.frontend_input, args.frontend_output, args.worker_addr)
    serve_metrics(args.metrics_port, args.metrics_host)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    service.start()
    service.run()
    return 0
