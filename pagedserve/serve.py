"""`pagedserve serve`: the whole stack on one machine — engine, workers and N frontends sharing
one port — as child processes. Waits until it answers, prints where it listens, and on Ctrl-C or
SIGTERM drains in order: the frontends first (they stop accepting and let open requests finish
within --shutdown-timeout), then the engine and the workers. If a child dies, names it and exits
non-zero."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pagedserve.entrypoints.unsupported import add_unsupported_flags
from shared.auth import add_auth_args
from shared.engine_args import add_flag, add_model_args, engine_config_from_args, flag_names
from shared.frontend_args import HTTP_FLAG_NAMES, add_http_arguments, check_frontend_args

# Flags forwarded to the engine and the workers as given (see shared/engine_args.py).
_MODEL_FLAGS = flag_names(add_model_args)


# Beyond --shutdown-timeout: what a frontend may take to send its final events and say Goodbye.
_FRONTEND_EXIT_S = 10.0


def demo_model() -> str:
    """A small random-weight checkpoint built once, so `make serve` works offline."""
    from pagedserve.test_model import make_test_model

    out = Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve")) / "demo-llama-small"
    if not (out / "config.json").is_file():
        print(f"pagedserve: building the demo checkpoint in {out}", flush=True)
        make_test_model(out, arch="llama", size="small")
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(args: argparse.Namespace, names: tuple[str, ...] = _MODEL_FLAGS) -> list[str]:
    """The flags of ``names`` as the children parse them (each child has the same flag)."""
    out = []
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def _children(args: argparse.Namespace, sock_dir: str) -> list[tuple[str, list[str]]]:
    """The command of every child. The engine's sockets are Unix sockets in ``sock_dir``, a
    private folder: no port to race for, nothing reachable from the network."""
    base = [sys.executable, "-m", "pagedserve.cli"]
    inp, outp, wrk = (f"ipc://{sock_dir}/{name}" for name in ("input", "output", "workers"))
    # CURVE on every link when given keys (off by default: these sockets are on loopback).
    auth = ["--curve-keys-dir", args.curve_keys_dir] if args.curve_keys_dir else []
    model = _forward(args) + auth
    engine = ["engine", *model, "--frontend-input", inp, "--frontend-output", outp, "--worker-addr", wrk]
    kids = [("engine", base + engine + ["--metrics-port", str(args.engine_metrics_port)])]
    dist = f"tcp://127.0.0.1:{free_port()}"
    for rank in range(args.tensor_parallel_size):
        worker = ["worker", *model, "--worker-addr", wrk, "--rank", str(rank), "--dist-init-addr", dist]
        port = args.worker_metrics_port + rank if args.worker_metrics_port else 0
        kids.append((f"worker-{rank}", base + worker + ["--metrics-port", str(port)]))
    front = ["--engine-input", inp, "--engine-output", outp, "--host", args.host, "--port", str(args.port),
             "--shutdown-timeout", str(args.shutdown_timeout)]
    front += auth + _forward(args, (*HTTP_FLAG_NAMES, "served_model_name"))  # every name, not just the engine's
    if args.api_key:
        front += ["--api-key", args.api_key]
    for i in range(args.frontends):
        # frontends share the HTTP port; each also serves its own /metrics so every one is scraped
        metrics = ["--metrics-port", str(args.frontend_metrics_port + i)] if args.frontend_metrics_port else []
        ready = ["--ready-file", _ready_file(sock_dir, i)]
        kids.append((f"frontend-{i}", base + ["frontend", *front, *metrics, *ready]))
    return kids


def _ready_file(sock_dir: str, index: int) -> str:
    return os.path.join(sock_dir, f"frontend-{index}.ready")


def _wait_ready(url: str, procs: dict[str, subprocess.Popen], ready_files: list[str], timeout_s: float) -> str | None:
    """None once every frontend has created its ready file and /health answers 200 (the port
    is shared, so one healthy answer says nothing of the other frontends); else the name of a
    child that died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                return name
        if not all(os.path.exists(f) for f in ready_files):
            time.sleep(0.2)
            continue
        try:
            # our own child on this machine: its certificate need not be one we can verify
            with urllib.request.urlopen(url, timeout=2, context=ssl._create_unverified_context()) as resp:
                if resp.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the stack did not become healthy within {timeout_s:.0f}s")


def _stop(procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM the children and wait up to ``timeout_s`` for them (then SIGKILL)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain(procs: dict[str, subprocess.Popen], shutdown_timeout: float) -> None:
    """Frontends first, so their open requests can finish while the engine and workers still
    run; then the rest."""
    frontends = {n: p for n, p in procs.items() if n.startswith("frontend")}
    _stop(frontends, shutdown_timeout + _FRONTEND_EXIT_S)
    _stop({n: p for n, p in procs.items() if n not in frontends}, 10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, model_positional=True)
    parser.add_argument("--demo", action="store_true", help="serve a small built-in random-weight checkpoint")
    add_flag(parser, "--host", "127.0.0.1", "address the frontends listen on")
    add_flag(parser, "--port", 8000, "port the frontends share (SO_REUSEPORT)")
    add_flag(parser, "--frontends", 1, "frontend processes", aliases=("--api-server-count", "-asc"))
    add_flag(parser, "--api-key", None, "require this Bearer token on /v1/*", kind=str)
    add_flag(parser, "--ready-timeout", 600.0, "seconds to wait for the stack to answer")
    add_flag(parser, "--shutdown-timeout", 10.0, "seconds open requests may take to finish on Ctrl-C or SIGTERM")
    add_flag(parser, "--engine-metrics-port", 8001, "the engine's /metrics port")
    add_flag(parser, "--worker-metrics-port", 8002, "rank 0's /metrics port (rank r: + r)")
    add_auth_args(parser)
    add_http_arguments(parser)
    add_flag(parser, "--frontend-metrics-port", 8100, "frontend 0's own /metrics port (frontend i: + i; 0: none)")
    parser.add_argument("--config", metavar="FILE.yaml", help="read flags from a YAML file, each key a flag's long "
                        "name (the command line wins)")
    add_unsupported_flags(parser)


def _check(args: argparse.Namespace) -> None:
    """Fail before any child starts on what the children would refuse (ValueError): the model
    and engine settings as the engine reads them, the frontends' flags (chat template, TLS files,
    parsers)."""
    check_frontend_args(args)
    engine_config_from_args(args, weights=False)


def run(args: argparse.Namespace) -> int:
    args.model = args.model_tag or args.model  # as vLLM: `serve MODEL` wins over --model and a config file's
    if args.demo or not args.model:
        args.model = demo_model()
        args.served_model_name = args.served_model_name or ["pagedserve-demo"]
    _check(args)
    stopping = False

    def on_signal(*_):
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    sock_dir = tempfile.mkdtemp(prefix="pagedserve-")
    # Their own session: Ctrl-C in a terminal reaches only us, and we stop them in order.
    procs = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in _children(args, sock_dir)}
    try:
        ready_files = [_ready_file(sock_dir, i) for i in range(args.frontends)]
        scheme = "https" if args.ssl_certfile else "http"
        url = f"{scheme}://{args.host}:{args.port}{args.root_path or ''}"
        dead = _wait_ready(f"{scheme}://{args.host}:{args.port}/health", procs, ready_files, args.ready_timeout)
        if dead is None:
            print(f"pagedserve: serving {', '.join(args.served_model_name or [args.model])} at {url}/v1 "
                  f"({args.frontends} frontend(s))", flush=True)
        while dead is None and not stopping:
            time.sleep(0.5)
            dead = next((n for n, p in procs.items() if p.poll() is not None), None)
        if dead is not None and not stopping:
            print(f"pagedserve: {dead} exited with code {procs[dead].returncode}; stopping the stack", file=sys.stderr)
            return 1
        return 0
    finally:
        _drain(procs, args.shutdown_timeout)
        shutil.rmtree(sock_dir, ignore_errors=True)
