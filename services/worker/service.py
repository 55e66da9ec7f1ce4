"""The worker process (`pagedserve worker`): one tensor-parallel rank. Loads the model, reports
its KV capacity to the engine, then executes step plans (link.py); rank 0 returns the sampled
tokens. A thread sends heartbeats meanwhile (heartbeat.py)."""

from __future__ import annotations

import argparse
import os
import signal
import uuid

import torch
import zmq

from services.worker.heartbeat import start_heartbeat
from services.worker.link import EngineLink, serve
from services.worker.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from shared.auth import add_auth_args, client_security
from shared.engine_args import DEFAULT_WORKER_ADDR, add_flag, add_model_args, engine_config_from_args
from shared.metrics import serve_metrics
from shared.protocol import EngineToWorker, WorkerReady, WorkerToEngine
from shared.transport import DealerQueue


def _init_distributed(args: argparse.Namespace, device: torch.device) -> None:
    if args.tensor_parallel_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=args.dist_init_addr, rank=args.rank, world_size=args.tensor_parallel_size
    )


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
