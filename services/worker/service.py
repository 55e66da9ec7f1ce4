"""The worker process (`pagedserve worker`): one tensor-parallel rank. Loads the model, reports
its KV capacity to the engine, then executes step plans (link.py); rank 0 returns the sampled
tokens. A thread sends heartbeats meanwhile (heartbeat.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import uuid

import torch
import zmq

from services.worker.distributed import init_parallel_groups
from services.worker.heartbeat import start_heartbeat
from services.worker.link import EngineLink, serve
from services.worker.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner, parse_device
from services.worker.rendezvous import Rendezvous, RendezvousError, add_rendezvous_args, join, resolve
from shared.auth import CurveClient, add_auth_args, client_security
from shared.config import EngineConfig
from shared.engine_args import DEFAULT_WORKER_ADDR, add_flag, add_model_args, engine_config_from_args
from shared.metrics import serve_metrics
from shared.protocol import EngineToWorker, WorkerReady, WorkerToEngine
from shared.transport import DealerQueue

log = logging.getLogger("pagedserve.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_flag(parser, "--worker-addr", DEFAULT_WORKER_ADDR, "the engine's worker ROUTER address")
    add_rendezvous_args(parser)
    add_flag(parser, "--device", None, "cuda, cuda:N or cpu (default: cuda:LOCAL_RANK when available)", kind=str)
    add_flag(parser, "--metrics-port", None, "port serving /metrics (default 8002 + local rank; 0: off)", kind=int)
    add_flag(parser, "--metrics-host", "127.0.0.1", "address serving /metrics (0.0.0.0: every interface)")
    add_auth_args(parser)


def run(args: argparse.Namespace) -> int:
    rdzv = resolve(args, args.tensor_parallel_size * args.pipeline_parallel_size)
    config = engine_config_from_args(args, rank=rdzv.rank)
    security = client_security(args, "worker")  # before the weights load: a bad key fails at once
    device = parse_device(args.device or (f"cuda:{rdzv.local_rank}" if torch.cuda.is_available() else "cpu"))
    metrics_port = 8002 + rdzv.local_rank if args.metrics_port is None else args.metrics_port
    return run_rank(config, rdzv, device, args.worker_addr, security, metrics_port, args.metrics_host)


def run_rank(
    config: EngineConfig, rdzv: Rendezvous, device: torch.device, worker_addr: str, security: CurveClient | None = None,
    metrics_port: int = 0, metrics_host: str = "127.0.0.1",
) -> int:
    """One rank: join its group, load the model, report to the engine at worker_addr and execute
    its plans until told to stop; returns the exit status. The served worker and the offline
    LLM's rank processes (pagedserve/llm_ranks.py) both run this."""
    rank = rdzv.rank
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rdzv.world_size))
    try:
        join(rdzv, "nccl" if device.type == "cuda" else "gloo")
    except RendezvousError as exc:
        log.error("%s", exc)
        return 1
    if rdzv.world_size > 1:
        init_parallel_groups(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size)
    runner = ModelRunner(config, device)
    metrics = WorkerMetrics(config.model.name, rank, runner)
    serve_metrics(metrics_port, metrics_host)
    ctx = zmq.Context()
    queue = DealerQueue(
        ctx, worker_addr, EngineToWorker, WorkerToEngine, identity=f"worker-{rank}".encode(),
        monitor=zmq.EVENT_HANDSHAKE_SUCCEEDED, security=security,
    )
    ready = WorkerReady(
        rank, config.parallel.world_size, runner.num_blocks, config.cache.block_size,
        config.model.max_model_len, uuid.uuid4().hex,
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    start_heartbeat(ctx, worker_addr, rank, ready.instance_id, security)
    return serve(runner, EngineLink(queue, ready, runner), rank, metrics)
