"""`pagedserve frontend`: one HTTP frontend process.

The process binds its listening socket itself with SO_REUSEPORT, so several frontends started
with the same --port share it (the kernel spreads connections across them), then hands the
socket to uvicorn. SIGTERM/SIGINT drain: stop accepting (the listening socket closes, so other
frontends on the port take new connections; a request that still arrives gets 503), let open
requests finish for up to --shutdown-timeout, end those still open with a final error (an SSE
error event and [DONE], or a 503 JSON error), then say Goodbye to the engine.

Entry points: ``main(argv)``, or ``add_arguments(parser)`` + ``run(args)`` for a subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from services.frontend.limits import RequestLimits
from services.frontend.state import FrontendConfig
from shared.auth import add_auth_args, client_security
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT

if TYPE_CHECKING:
    from services.frontend.engine_client import EngineClient

log = logging.getLogger("pagedserve.frontend")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PAGEDSERVE_{name}", default)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The frontend's flags; each defaults to its PAGEDSERVE_* environment variable."""
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on (PAGEDSERVE_HOST)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000")), help="HTTP port, shareable (PAGEDSERVE_PORT)")
    p.add_argument("--engine-input", default=_env("ENGINE_INPUT", DEFAULT_ENGINE_INPUT), help="engine input ROUTER address")
    p.add_argument("--engine-output", default=_env("ENGINE_OUTPUT", DEFAULT_ENGINE_OUTPUT), help="engine output ROUTER address")
    p.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY' on /v1/*")
    names = _env("SERVED_MODEL_NAME")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=names.split(",") if names else None,
        help="model name(s) clients use (default: the engine's); env PAGEDSERVE_SERVED_MODEL_NAME, comma-separated",
    )
    p.add_argument(
        "--tokenizer",
        "--model",
        dest="tokenizer",
        default=_env("TOKENIZER"),
        help="tokenizer directory or hub id (default: the model path the engine reports)",
    )
    p.add_argument(
        "--frontend-id",
        default=None,
        help="this frontend's engine identity, unique per process (default: a random uuid4; no env variable, "
        "since replicas share their environment)",
    )
    metrics_port = _env("METRICS_PORT")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(metrics_port) if metrics_port else None,
        help="also serve this process's /metrics on its own port (to scrape each of several frontends)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=float(_env("HEALTH_TIMEOUT", "5")),
        help="seconds /health waits for the engine's Pong before answering 503",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=float(_env("STALL_TIMEOUT", "10")),
        help="seconds a request waits for output before pinging the engine (503 if it does not answer)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=float(_env("SHUTDOWN_TIMEOUT", "10")),
        help="seconds open requests may take to finish after SIGTERM",
    )
    p.add_argument(
        "--resume-timeout",
        type=float,
        default=float(_env("RESUME_TIMEOUT", "30")),
        help="seconds a request waits for a silent engine to come back (a restarted engine resumes it)",
    )
    add_limit_arguments(p)
    p.add_argument("--disable-ui", action="store_true", default=_env("DISABLE_UI", "") in ("1", "true"),
                   help="do not serve the chat page at /")
    p.add_argument("--ready-file", default=None,
                   help="create this file once the frontend can serve (`pagedserve serve` waits for every frontend's)")
    add_auth_args(p)
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    return p


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one request may ask (services.frontend.limits); past a limit, a clear 4xx. `serve`
    takes the same flags and forwards them to its frontends."""
    d = RequestLimits()
    p.add_argument("--max-request-body-bytes", type=int, default=int(_env("MAX_REQUEST_BODY_BYTES", str(d.max_request_body_bytes))),
                   help="larger request bodies get 413 (PAGEDSERVE_MAX_REQUEST_BODY_BYTES)")
    p.add_argument("--max-n", type=int, default=int(_env("MAX_N", str(d.max_n))), help="most samples (n) per prompt")
    p.add_argument("--max-logprobs", type=int, default=int(_env("MAX_LOGPROBS", str(d.max_logprobs))),
                   help="most logprobs / top_logprobs / prompt_logprobs a request may ask (at most 20, the engine's)")
    p.add_argument("--max-prompts-per-request", type=int,
                   default=int(_env("MAX_PROMPTS_PER_REQUEST", str(d.max_prompts_per_request))),
                   help="most prompts in one completions request")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   default=_env("TRUST_REQUEST_CHAT_TEMPLATE", "") in ("1", "true"),
                   help="render chat templates sent by clients (sandboxed, in a child process killed after "
                   "--chat-template-timeout); without it such requests get 400")
    p.add_argument("--chat-template-timeout", type=float,
                   default=float(_env("CHAT_TEMPLATE_TIMEOUT", str(d.chat_template_timeout))),
                   help="seconds a client's chat template may take to render")


def _limits(args: argparse.Namespace) -> RequestLimits:
    try:  # each field has the flag of the same name
        return RequestLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RequestLimits)})
    except ValueError as exc:
        raise SystemExit(f"pagedserve frontend: {exc}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT (and SO_REUSEADDR), shareable between processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("this platform has no SO_REUSEPORT; run one frontend per port")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# Beyond --shutdown-timeout: time for the final error events to reach the clients.
_FLUSH_GRACE_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine client while uvicorn stops accepting and waits for
    open responses, and not re-raising the caught signal after a graceful shutdown, so the process
    exits 0 once it has said Goodbye."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, shutdown_timeout: float):
        super().__init__(config)
        self.client, self.shutdown_timeout = client, shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.client.drain(self.shutdown_timeout), name="drain")
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    from services.frontend.app import build_app

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(args.log_level.upper())  # also when `pagedserve` configured logging first
    config = FrontendConfig(
        engine_input=args.engine_input,
        engine_output=args.engine_output,
        api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name or ()),
        tokenizer=args.tokenizer,
        curve=client_security(args, "frontend"),
        frontend_id=args.frontend_id,
        health_timeout=args.health_timeout,
        stall_timeout=args.stall_timeout,
        resume_timeout=args.resume_timeout,
        ready_file=args.ready_file,
        limits=_limits(args),
        enable_ui=not args.disable_ui,
    )
    app = build_app(config)
    state = app.state.frontend
    if args.metrics_port is not None:
        from services.frontend.metrics import serve_metrics

        serve_metrics(state.metrics, args.host, args.metrics_port)
    sock = bind_socket(args.host, args.port)
    log.info("frontend %s listening on %s:%d, engine %s / %s", state.frontend_id, args.host,
             sock.getsockname()[1], args.engine_input, args.engine_output)
    uv_config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout + _FLUSH_GRACE_S,
        access_log=args.log_level == "debug",
        lifespan="on",
    )
    _Server(uv_config, state.client, args.shutdown_timeout).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="pagedserve frontend", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
