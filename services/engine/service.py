"""The engine process (`pagedserve engine`): its flags, and the service built from them.

The scheduler and KV block manager with frontends on ROUTER sockets and workers behind
(loop.py: the core loop and recovery; frontend_io.py: the socket threads). No torch here.
"""

from __future__ import annotations

import argparse
import signal

from services.engine.loop import EngineService
from shared.auth import add_auth_args, engine_security
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT, DEFAULT_WORKER_ADDR, add_flag
from shared.metrics import serve_metrics


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
        args.frontend_timeout, None if args.disable_log_stats else args.log_stats_interval,
    )
    serve_metrics(args.metrics_port, args.metrics_host)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    service.start()
    service.run()
    return 0
