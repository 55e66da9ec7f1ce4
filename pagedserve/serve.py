"""`pagedserve serve`: the whole stack on one machine — engine, workers and N frontends sharing
one port; with --data-parallel-size, several engine+worker replicas behind the same frontends —
as child processes. Waits until it answers, prints where it listens, and on Ctrl-C or
SIGTERM drains in order: the frontends first (they stop accepting and let open requests finish
within --shutdown-timeout), then the engine and the workers. Once serving, a replica whose engine
or worker dies is restarted while the others serve (supervisor.py); a child that dies during
start-up, or a frontend at any time, stops the stack: serve names it and exits non-zero."""

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

from pagedserve import lifeline
from pagedserve.entrypoints.unsupported import add_unsupported_flags
from pagedserve.supervisor import Child, Supervisor
from shared.auth import add_auth_args
from shared.engine_args import (
    DEFAULT_DIST_TIMEOUT_S,
    add_flag,
    add_model_args,
    engine_config_from_args,
    flag_names,
)
from shared.frontend_args import (
    HTTP_FLAG_NAMES,
    add_http_arguments,
    add_routing_arguments,
    check_frontend_args,
)

# Flags forwarded to the engine and the workers as given (see shared/engine_args.py).
_MODEL_FLAGS = flag_names(add_model_args)
_CLI = [sys.executable, "-m", "pagedserve.cli"]
ROUTING_FLAG_NAMES = flag_names(add_routing_arguments)  # forwarded to the frontends


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


def _replica(args: argparse.Namespace, sock_dir: str, replica: int, model: list[str]) -> tuple[list[Child], str, str]:
    """Data-parallel replica ``replica``'s engine and workers, and the engine's input and output
    addresses. Each replica has its own sockets, its metrics ports right after the previous
    replica's (engine, then one per rank) and, on a GPU machine, its own devices."""
    base = _CLI
    tag = f"-{replica}" if args.data_parallel_size > 1 else ""
    inp, outp, wrk = (f"ipc://{sock_dir}/{name}{tag}" for name in ("input", "output", "workers"))
    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    shift = replica * (1 + ranks)
    engine = ["engine", *model, "--frontend-input", inp, "--frontend-output", outp, "--worker-addr", wrk]
    engine_port = args.engine_metrics_port + shift if args.engine_metrics_port else 0
    kids: list[Child] = [(f"engine{tag}", base + engine + ["--metrics-port", str(engine_port)], {})]
    dist = f"tcp://127.0.0.1:{free_port()}"
    gpus = visible_gpus() if args.data_parallel_size > 1 else []
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[replica * ranks : (replica + 1) * ranks])} if gpus else {}
    for rank in range(ranks):
        worker = ["worker", *model, "--worker-addr", wrk, "--rank", str(rank), "--dist-init-addr", dist,
                  "--dist-timeout", str(args.dist_timeout)]
        port = args.worker_metrics_port + shift + rank if args.worker_metrics_port else 0
        kids.append((f"worker{tag}-{rank}", base + worker + ["--metrics-port", str(port)], env))
    return kids, inp, outp


def visible_gpus() -> list[str]:
    """The GPUs our children may use: CUDA_VISIBLE_DEVICES's list when set, else those
    ``nvidia-smi -L`` lists; none on a machine without NVIDIA's tools. Each data-parallel replica
    gets its own slice as its workers' CUDA_VISIBLE_DEVICES (worker rank r takes cuda:r of it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def _children(args: argparse.Namespace, sock_dir: str) -> list[Child]:
    """The command of every child. The engines' sockets are Unix sockets in ``sock_dir``, a
    private folder: no port to race for, nothing reachable from the network."""
    base = _CLI
    # CURVE on every link when given keys (off by default: these sockets are on loopback).
    auth = ["--curve-keys-dir", args.curve_keys_dir] if args.curve_keys_dir else []
    model = _forward(args) + auth
    kids: list[Child] = []
    inputs, outputs = [], []
    for replica in range(args.data_parallel_size):
        replica_kids, inp, outp = _replica(args, sock_dir, replica, model)
        kids += replica_kids
        inputs.append(inp)
        outputs.append(outp)
    front = ["--engine-input", *inputs, "--engine-output", *outputs, "--host", args.host, "--port", str(args.port),
             "--shutdown-timeout", str(args.shutdown_timeout)]
    # every served name, not just the engine's
    front += auth + _forward(args, (*HTTP_FLAG_NAMES, *ROUTING_FLAG_NAMES, "served_model_name"))
    if args.api_key:
        front += ["--api-key", args.api_key]
    for i in range(args.frontends):
        # frontends share the HTTP port; each also serves its own /metrics so every one is scraped
        metrics = ["--metrics-port", str(args.frontend_metrics_port + i)] if args.frontend_metrics_port else []
        ready = ["--ready-file", _ready_file(sock_dir, i)]
        kids.append((f"frontend-{i}", base + ["frontend", *front, *metrics, *ready], {}))
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
    add_flag(parser, "--data-parallel-size", 1, "engine+worker replicas behind the frontends, each with its own "
             "KV cache; the frontends route each request by prefix affinity and load (--data-parallel-routing)",
             aliases=("-dp",))
    add_routing_arguments(parser)
    add_flag(parser, "--dist-timeout", DEFAULT_DIST_TIMEOUT_S, "seconds the workers of a replica wait for each other "
             "(joining, and in a collective) before a rank exits and the replica's workers restart")
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
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {args.data_parallel_size}")
    if args.dist_timeout <= 0:
        raise ValueError("--dist-timeout must be positive")
    gpus = visible_gpus() if args.data_parallel_size > 1 else []
    needed = args.data_parallel_size * args.tensor_parallel_size * args.pipeline_parallel_size
    if gpus and needed > len(gpus):  # else a replica would fall back to the CPU without a word
        raise ValueError(f"--data-parallel-size {args.data_parallel_size} x --tensor-parallel-size "
                         f"{args.tensor_parallel_size} x --pipeline-parallel-size {args.pipeline_parallel_size} "
                         f"needs {needed} GPUs; {len(gpus)} visible")
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
    lifeline_fd, _keep_open = lifeline.open_pipe()  # the children end when this process does
    # Their own session: Ctrl-C in a terminal reaches only us, and we stop them in order.
    supervisor = Supervisor(_children(args, sock_dir), lambda cmd, env: subprocess.Popen(
        cmd, start_new_session=True, pass_fds=(lifeline_fd,),
        env={**os.environ, **(env or {}), **lifeline.child_env(lifeline_fd)}))
    procs = supervisor.procs  # the supervisor replaces a child it restarts here
    try:
        ready_files = [_ready_file(sock_dir, i) for i in range(args.frontends)]
        scheme = "https" if args.ssl_certfile else "http"
        url = f"{scheme}://{args.host}:{args.port}{args.root_path or ''}"
        dead = _wait_ready(f"{scheme}://{args.host}:{args.port}/health", procs, ready_files, args.ready_timeout)
        if dead is None:
            print(f"pagedserve: serving {', '.join(args.served_model_name or [args.model])} at {url}/v1 "
                  f"({args.frontends} frontend(s), {args.data_parallel_size} engine replica(s))", flush=True)
        while dead is None and not stopping:
            time.sleep(0.5)
            dead = supervisor.check()  # restarts a replica's engine or workers; a dead frontend stops us
        if dead is not None and not stopping:
            print(f"pagedserve: {dead} exited with code {procs[dead].returncode}; stopping the stack", file=sys.stderr)
            return 1
        return 0
    finally:
        _drain(procs, args.shutdown_timeout)
        shutil.rmtree(sock_dir, ignore_errors=True)
