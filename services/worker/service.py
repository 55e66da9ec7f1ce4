"""The worker process: one tensor-parallel rank. Reports its KV capacity to the engine, then
executes step plans; rank 0 returns the sampled tokens."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from services.worker.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from shared.auth import CurveClient, add_auth_args, client_security
from shared.engine_args import DEFAULT_WORKER_ADDR, add_flag, add_model_args, engine_config_from_args
from shared.metrics import serve_metrics
from shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    EngineToWorker,
    Shutdown,
    StepPlan,
    WorkerAccepted,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.transport import DealerQueue

log = logging.getLogger("pagedserve.worker")


def _init_distributed(args: argparse.Namespace, device: torch.device) -> None:
    if args.tensor_parallel_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=args.dist_init_addr, rank=args.rank, world_size=args.tensor_parallel_size
    )


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


def start_heartbeat(
    ctx: zmq.Context, addr: str, rank: int, instance_id: str, security: CurveClient | None = None
) -> threading.Thread:
    """A daemon thread telling the engine every HEARTBEAT_INTERVAL_S that this rank is alive,
    also while a step runs. Its own socket: ZeroMQ sockets are not shared between threads."""
    queue = DealerQueue(ctx, addr, EngineToWorker, WorkerToEngine, immediate=True, security=security)

    def beat() -> None:
        try:
            while True:
                queue.send(WorkerHeartbeat(rank, instance_id), block=False)  # dropped while the engine is away
                time.sleep(HEARTBEAT_INTERVAL_S)
        except Exception:  # a worker without heartbeats looks lost forever: exit, the supervisor restarts it
            log.exception("the heartbeat thread failed; exiting")
            os._exit(1)

    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()
    return thread


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
        received_at, start = time.time(), time.perf_counter()
        try:
            result = runner.execute(msg)
        except Exception as exc:  # report, keep the process alive for the engine to decide
            log.exception("step %d failed", msg.step_id)
            queue.send(WorkerFailed(rank, msg.step_id, f"{type(exc).__name__}: {exc}"))
            idle_since = time.perf_counter()
            continue
        result.received_at, result.idle_s = received_at, start - idle_since
        idle_since = time.perf_counter()
        result.compute_s = idle_since - start
        if rank == 0:
            queue.send(result)
        metrics.observe(runner.last_stats, len(result.failed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_flag(parser, "--worker-addr", DEFAULT_WORKER_ADDR, "the engine's worker ROUTER address")
    add_flag(parser, "--rank", 0, "tensor-parallel rank of this worker")
    add_flag(parser, "--device", None, "cuda, cuda:N or cpu (default: cuda:RANK when available)", kind=str)
    add_flag(parser, "--dist-init-addr", "tcp://127.0.0.1:29500", "torch.distributed rendezvous for TP > 1")
    add_flag(parser, "--metrics-port", None, "port serving /metrics (default 8002 + rank; 0: off)", kind=int)
    add_flag(parser, "--metrics-host", "127.0.0.1", "address serving /metrics (0.0.0.0: every interface)")
    add_auth_args(parser)


def run(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args, rank=args.rank)
    security = client_security(args, "worker")  # before the weights load: a bad key fails at once
    device = torch.device(args.device or (f"cuda:{args.rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.tensor_parallel_size))
    _init_distributed(args, device)
    runner = ModelRunner(config, device)
    metrics = WorkerMetrics(config.model.name, args.rank, runner)
    serve_metrics(8002 + args.rank if args.metrics_port is None else args.metrics_port, args.metrics_host)
    ctx = zmq.Context()
    queue = DealerQueue(
        ctx, args.worker_addr, EngineToWorker, WorkerToEngine, identity=f"worker-{args.rank}".encode(),
        monitor=zmq.EVENT_HANDSHAKE_SUCCEEDED, security=security,
    )
    ready = WorkerReady(
        args.rank, config.parallel.tensor_parallel_size, runner.num_blocks, config.cache.block_size,
        config.model.max_model_len, uuid.uuid4().hex,
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    start_heartbeat(ctx, args.worker_addr, args.rank, ready.instance_id, security)
    return serve(runner, EngineLink(queue, ready, runner), args.rank, metrics)
