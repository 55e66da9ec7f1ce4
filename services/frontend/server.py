"""`pagedserve frontend`: one HTTP frontend process.

The process binds its listening socket itself with SO_REUSEPORT, so several frontends started
with the same --port share it (the kernel spreads connections across them), then hands the
socket to uvicorn. SIGTERM/SIGINT drain: stop accepting (the listening socket closes, so other
frontends on the port take new connections; a request that still arrives gets 503), let open
requests finish for up to --shutdown-timeout, end those still open with a final error (an SSE
error event and [DONE], or a 503 JSON error), then say Goodbye to the engine.

Entry points: ``main(argv)``, or ``add_arguments(parser)`` + ``run(args)`` for a subcommand; the
flags are in shared/frontend_args.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from services.frontend.state import FrontendConfig
from shared import frontend_args as server_flags
from shared.auth import client_security
from shared.frontend_args import add_arguments
from shared.lora import parse_lora_modules

if TYPE_CHECKING:
    from services.frontend.replicas import EngineReplicas

log = logging.getLogger("pagedserve.frontend")


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

    def __init__(self, config: uvicorn.Config, engines: EngineReplicas, shutdown_timeout: float):
        super().__init__(config)
        self.engines, self.shutdown_timeout = engines, shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.engines.drain(self.shutdown_timeout), name="drain")
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


def frontend_config(args: argparse.Namespace) -> FrontendConfig:
    """The frozen configuration of one frontend, from its flags (ValueError naming a bad one)."""
    chat_template = server_flags.check_frontend_args(args)
    return FrontendConfig(
        engine_inputs=tuple(args.engine_input),
        engine_outputs=tuple(args.engine_output),
        data_parallel_routing=args.data_parallel_routing,
        api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name or ()),
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        curve=client_security(args, "frontend"),
        frontend_id=args.frontend_id,
        health_timeout=args.health_timeout,
        stall_timeout=args.stall_timeout,
        resume_timeout=args.resume_timeout,
        ready_file=args.ready_file,
        limits=server_flags.limits(args),
        enable_ui=not args.disable_ui,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        chat_template=chat_template,
        response_store_max_entries=args.response_store_max_entries,
        response_store_ttl=args.response_store_ttl,
        response_role=args.response_role,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        force_include_usage=args.enable_force_include_usage,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        request_id_headers=args.enable_request_id_headers,
        log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        vllm_metric_names=args.vllm_metric_names,
        lora_modules=parse_lora_modules(args.lora_modules),
    )


def _add_cors(app, args: argparse.Namespace) -> None:
    """vLLM's CORS flags; no CORS headers at all unless --allowed-origins is given."""
    origins = server_flags.word_list(args.allowed_origins)
    if not origins:
        return
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=args.allow_credentials,
                       allow_methods=server_flags.word_list(args.allowed_methods),
                       allow_headers=server_flags.word_list(args.allowed_headers))


def run(args: argparse.Namespace) -> int:
    from services.frontend.app import build_app

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(args.log_level.upper())  # also when `pagedserve` configured logging first
    try:
        config = frontend_config(args)
        app = build_app(config)
        _add_cors(app, args)
    except ValueError as exc:
        raise SystemExit(f"pagedserve frontend: {exc}") from None
    state = app.state.frontend
    if args.metrics_port is not None:
        from services.frontend.metrics import serve_metrics

        serve_metrics(state.metrics, args.host, args.metrics_port)
    sock = bind_socket(args.host, args.port)
    log.info("frontend %s listening on %s:%d%s, engine %s / %s", state.frontend_id, args.host,
             sock.getsockname()[1], " (https)" if args.ssl_certfile else "",  " ".join(args.engine_input), " ".join(args.engine_output))
    uv_config = uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.shutdown_timeout + _FLUSH_GRACE_S,
        access_log=args.uvicorn_log_level in ("debug", "trace") and not args.disable_uvicorn_access_log,
        lifespan="on",
        root_path=args.root_path or "",
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
    )
    _Server(uv_config, state.engines, args.shutdown_timeout).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="pagedserve frontend", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
