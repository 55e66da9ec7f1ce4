"""The compose stack, run as local processes: the engine, the worker (CPU variant) and two
frontends start with the command and environment docker-compose.yml (+ docker-compose.cpu.yml)
gives them, with the service names mapped to 127.0.0.1 and each socket moved to a free port;
nginx (the OS binary) runs the repository's nginx.conf rendered for those two frontends.

CURVE is on as the compose file says: keys from `pagedserve keys`, and each service sees only the
secret files compose mounts for it.

Test-only additions to the compose environment: loopback addresses and free ports, HF_HOME in a
temporary directory, HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1 (this machine is small), and a tiny
random-weight model as MODEL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from deploy_helpers import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    REPO,
    find_binary,
    load_compose,
    service_environment,
)
from deploy_procs import Proc, wait_http

from pagedserve.serve import free_port

NGINX = find_binary("nginx")
COMPOSE_PORTS = (5570, 5571, 5572, 8001, 8002)  # engine sockets, engine and worker /metrics


@dataclass
class LocalStack:
    logs: Path
    ports: dict[int, int]  # compose port -> local port
    frontend_ports: list[int]
    nginx_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    compose: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def close(self) -> None:
        # nginx and the frontends first (they say Goodbye), then the engine, then the worker.
        for name in ("nginx", "frontend-1", "frontend-2", "engine", "worker"):
            if name in self.procs:
                self.procs[name].close()


def _mount_secrets(service: dict, secrets: dict, root: Path) -> None:
    """Each secret the service lists, copied to `root` + its target path, as compose mounts it
    (so the service sees only its own key files)."""
    for ref in service.get("secrets", []):
        target = root / ref["target"].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(secrets[ref["source"]]["file"], target)


def _localize(env: dict[str, str], ports: dict[int, int], hf_home: Path, secrets_root: Path) -> dict[str, str]:
    """Compose's service names, container ports and secret mounts, as local addresses and paths."""
    out = {}
    for key, value in env.items():
        value = re.sub(r"tcp://(?:engine|0\.0\.0\.0):(\d+)", lambda m: f"tcp://127.0.0.1:{ports[int(m.group(1))]}",
                       value)
        if key == "PAGEDSERVE_METRICS_PORT":
            value = str(ports[int(value)])
        if key == "PAGEDSERVE_HOST" and value == "0.0.0.0":
            value = "127.0.0.1"
        if key == "HF_HOME":
            value = str(hf_home)
        if value.startswith("/run/secrets/"):
            value = str(secrets_root / value.lstrip("/"))
        out[key] = value
    return out


def _process_env(compose_env: dict[str, str], **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    return {**base, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **compose_env, **extra}


def _start_service(stack: LocalStack, name: str, service: dict, env: dict[str, str]) -> Proc:
    command = service["command"]
    script = re.search(r'^pagedserve = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert command[0] == "pagedserve" and script and script.group(1) == "pagedserve.cli:main", command
    proc = Proc.python_module(name, "pagedserve.cli", command[1:], stack.logs, env)
    stack.procs[name] = proc
    return proc


def render_nginx_conf(env: dict[str, str]) -> str:
    """deploy/nginx/nginx.conf as the nginx image renders it: envsubst of the variables that are set
    and match NGINX_ENVSUBST_FILTER."""
    text = (REPO / "deploy/nginx/nginx.conf").read_text()
    wanted = re.compile(env.get("NGINX_ENVSUBST_FILTER", ""))

    def sub(m: re.Match) -> str:
        name = m.group(1)
        return env[name] if name in env and wanted.search(name) else m.group(0)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


@contextmanager
def running_stack(model: Path, logs: Path) -> Iterator[LocalStack]:
    """The compose services on `model`, logs and keys in `logs`, behind nginx; all stopped on exit."""
    subprocess.run([sys.executable, "-m", "pagedserve.cli", "keys", str(logs / "keys")], check=True, timeout=60)
    compose = load_compose(COMPOSE_FILE, COMPOSE_CPU_FILE, env={
        "MODEL": str(model), "KV_CACHE_MEMORY": str(64 << 20), "CURVE_KEYS_DIR": str(logs / "keys")})
    st = LocalStack(logs, {p: free_port() for p in COMPOSE_PORTS}, [free_port(), free_port()], compose=compose)
    services = compose["services"]
    hf_home = logs / "hf-home"
    try:
        for name in ("engine", "worker", "frontend"):
            _mount_secrets(services[name], compose["secrets"], logs / f"secrets-{name}")
        for name in ("engine", "worker"):
            env = _localize(service_environment(services[name]), st.ports, hf_home, logs / f"secrets-{name}")
            # ngram speculation on, as a deployment may set it: its dashboard panel gets live data
            extra = {"PAGEDSERVE_METRICS_HOST": "127.0.0.1",
                     "PAGEDSERVE_SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 3}'}
            if name == "worker":
                extra["OMP_NUM_THREADS"] = "1"
            _start_service(st, name, services[name], _process_env(env, **extra))
        for i, port in enumerate(st.frontend_ports, 1):
            env = _localize(service_environment(services["frontend"]), st.ports, hf_home, logs / "secrets-frontend")
            env["PAGEDSERVE_PORT"] = str(port)  # one port per replica (containers each have their own)
            _start_service(st, f"frontend-{i}", services["frontend"], _process_env(env))
        for port in st.frontend_ports:
            wait_http(f"http://127.0.0.1:{port}/health", list(st.procs.values()), timeout=180)
        _start_nginx(st, services["nginx"], logs)
        yield st
    finally:
        st.close()


def _start_nginx(st: LocalStack, service: dict, logs: Path) -> None:
    st.nginx_port = free_port()
    nginx_env = service_environment(service)
    nginx_env["NGINX_PORT"] = str(st.nginx_port)
    nginx_env["NGINX_UPSTREAM_SERVERS"] = " ".join(f"server 127.0.0.1:{p};" for p in st.frontend_ports)
    conf = logs / "nginx.conf"
    conf.write_text(render_nginx_conf(nginx_env))
    assert not re.search(r"^[^#]*\$\{", conf.read_text(), re.MULTILINE), "a template variable was left unset"
    st.procs["nginx"] = Proc("nginx", [NGINX, "-e", "stderr", "-p", str(logs), "-c", str(conf),
                                       "-g", f"daemon off; pid {logs}/nginx.pid;"], logs)
    wait_http(f"{st.base}/nginx-health", [st.procs["nginx"]], timeout=20)


def complete(client: httpx.Client, base: str, model: str, i: int, max_tokens: int = 8) -> httpx.Response:
    """One greedy completion of a numbered prompt, through `base`."""
    body = {"model": model, "prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    return client.post(f"{base}/v1/completions", json=body, timeout=60)
