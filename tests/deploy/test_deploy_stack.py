"""The compose stack, run as local processes: the engine, the worker (CPU variant) and two
frontends start with the command and environment docker-compose.yml (+ docker-compose.cpu.yml)
gives them, with the service names mapped to 127.0.0.1 and each socket moved to a free port;
nginx (the OS binary) runs the repository's nginx.conf rendered for those two frontends; a real
Prometheus scrapes everything (with the repository's job names and alert rules) while load runs,
and every dashboard query and alert rule is evaluated through its HTTP API.

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
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
import zmq
from deploy_helpers import (
    ALL_METRICS,
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    DASHBOARDS,
    MONITORING,
    REPO,
    WORKER_METRICS,
    Proc,
    dashboard_targets,
    find_binary,
    grafana_to_promql,
    load_compose,
    metric_names,
    service_environment,
    wait_http,
)
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.serve import free_port
from shared.protocol import EngineMessage, EngineToWorker, FrontendMessage, Hello, WorkerReady, WorkerToEngine
from shared.transport import DealerQueue

pytestmark = pytest.mark.timeout(300)

NGINX = find_binary("nginx")
PROMETHEUS = find_binary("prometheus")
# Seconds of load at most before the queries run: until then, the fixture waits for every dashboard
# panel to have data (a rate needs two scrapes in its 15s window), not a fixed time.
LOAD_SECONDS = 45.0
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


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory) -> Iterator[LocalStack]:
    if NGINX is None:
        pytest.skip("nginx not found: apt-get install -y nginx (.ci/run does)")
    logs = tmp_path_factory.mktemp("stack")
    model = model_dirs("llama")
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

        st.nginx_port = free_port()
        nginx_env = service_environment(services["nginx"])
        nginx_env["NGINX_PORT"] = str(st.nginx_port)
        nginx_env["NGINX_UPSTREAM_SERVERS"] = " ".join(f"server 127.0.0.1:{p};" for p in st.frontend_ports)
        conf = logs / "nginx.conf"
        conf.write_text(render_nginx_conf(nginx_env))
        assert not re.search(r"^[^#]*\$\{", conf.read_text(), re.MULTILINE), "a template variable was left unset"
        st.procs["nginx"] = Proc("nginx", [NGINX, "-e", "stderr", "-p", str(logs), "-c", str(conf),
                                           "-g", f"daemon off; pid {logs}/nginx.pid;"], logs)
        wait_http(f"{st.base}/nginx-health", [st.procs["nginx"]], timeout=20)
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def model_name(stack: LocalStack) -> str:
    return httpx.get(f"{stack.base}/v1/models", timeout=30).json()["data"][0]["id"]


def _complete(client: httpx.Client, base: str, model: str, i: int, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    return client.post(f"{base}/v1/completions", json=body, timeout=60)


def test_nginx_balances_across_both_frontends(stack, model_name):
    answered_by = Counter()
    with httpx.Client() as client:
        for i in range(20):
            resp = _complete(client, stack.base, model_name, i)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] is not None
            answered_by[resp.headers.get("x-pagedserve-frontend")] += 1
    assert len(answered_by) == 2 and min(answered_by.values()) >= 3, answered_by
    upstreams = Counter(re.findall(r"upstream=127\.0\.0\.1:(\d+)", stack.procs["nginx"].log(200_000)))
    assert {int(p) for p in upstreams} == set(stack.frontend_ports), upstreams


def test_streaming_passes_through_nginx(stack, model_name):
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 16, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    events = []
    with httpx.stream("POST", f"{stack.base}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]" and len(events) >= 3, events


def _metrics_text(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_each_frontend_counts_the_responses_it_served(stack, model_name):
    with httpx.Client() as client:
        for i in range(6):
            assert _complete(client, stack.base, model_name, i).status_code == 200
    for port in stack.frontend_ports:
        served = [s for fam in text_string_to_metric_families(_metrics_text(port)) for s in fam.samples
                  if s.name == "pagedserve_frontend_http_responses_total"]
        assert served, f"frontend on {port} exports no pagedserve_frontend_http_responses_total"
        assert sum(s.value for s in served if s.labels.get("endpoint", "").endswith("completions")) > 0, served


def test_engine_links_need_the_keys(stack):
    """A peer without keys reaches neither the engine's frontend sockets nor its worker socket."""
    ctx = zmq.Context()
    port = "tcp://127.0.0.1:{}".format
    try:
        front = DealerQueue(ctx, port(stack.ports[5570]), EngineMessage, FrontendMessage, b"stranger")
        back = DealerQueue(ctx, port(stack.ports[5571]), EngineMessage, FrontendMessage, b"stranger")
        worker = DealerQueue(ctx, port(stack.ports[5572]), EngineToWorker, WorkerToEngine, b"worker-0")
        for _ in range(5):
            front.send(Hello("stranger"), block=False)
            worker.send(WorkerReady(0, 1, 4, 16, 128), block=False)
            time.sleep(0.2)
        assert back.recv(timeout_ms=1000) is None and worker.recv(timeout_ms=1000) is None
    finally:
        ctx.destroy(linger=0)
    engine = {s.name: s.value for fam in text_string_to_metric_families(_metrics_text(stack.ports[8001]))
              for s in fam.samples}
    assert engine["pagedserve_engine_connected_workers"] == 1
    assert engine["pagedserve_engine_worker_restarts_total"] == 0  # the forged rank 0 never registered
    resp = httpx.get(f"{stack.base}/health", timeout=30)
    assert resp.status_code == 200, resp.text


def test_compose_healthchecks_pass(stack):
    """Each service's compose healthcheck command, pointed at the local ports, exits 0."""
    local = {8000: stack.frontend_ports[0], 8001: stack.ports[8001], 8002: stack.ports[8002]}
    failures = []
    for name in ("frontend", "engine", "worker"):
        test = stack.compose["services"][name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        code = re.sub(r"127\.0\.0\.1:(800[012])\b", lambda m: f"127.0.0.1:{local[int(m.group(1))]}", test[3])
        proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            failures.append(f"{name}: {proc.stderr.strip().splitlines()[-1:]}")
    assert not failures, failures


# ----- Prometheus -------------------------------------------------------------------------------


class Load:
    """Traffic through nginx on two threads: plain and streaming completions, chat, a few bad
    requests (4xx) and streams the client abandons (aborts)."""

    def __init__(self, base: str, model: str):
        self.base, self.model = base, model
        self.stop = threading.Event()
        self.statuses: Counter = Counter()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(2)]
        self.started = time.monotonic()
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = k
            while not self.stop.is_set():
                try:
                    self._one(client, i)
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
                i += 2

    def _one(self, client: httpx.Client, i: int) -> None:
        url = f"{self.base}/v1/completions"
        prompt = "Shared system prompt for the prefix cache. " * 4 + f"Question {i}"
        if i % 9 == 4:  # a bad request
            resp = client.post(url, json={"model": self.model, "prompt": "x", "max_tokens": -1})
        elif i % 9 == 7:  # a stream the client leaves after its first event
            with client.stream("POST", url, json={"model": self.model, "prompt": prompt, "max_tokens": 64,
                                                  "stream": True, "ignore_eos": True}) as resp:
                next(resp.iter_lines(), None)
        elif i % 3 == 0:
            with client.stream("POST", url, json={"model": self.model, "prompt": prompt, "max_tokens": 16,
                                                  "stream": True, "ignore_eos": True}) as resp:
                for _ in resp.iter_lines():
                    pass
        elif i % 3 == 1:
            resp = client.post(f"{self.base}/v1/chat/completions", json={
                "model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12})
        else:
            resp = _complete(client, self.base, self.model, i, max_tokens=12)
        self.statuses[resp.status_code] += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> tuple[str | None, list]:
        """(error, result) of an instant query now."""
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = resp.json()
        if body.get("status") != "success":
            return f"{body.get('errorType')}: {body.get('error')}", []
        return None, body["data"]["result"]

    def exists(self, name: str) -> bool:
        return bool(self.query(f'count({{__name__="{name}"}})')[1])


def _local_prometheus_config(stack: LocalStack, path: Path) -> None:
    """monitoring/prometheus.yml with its jobs pointed at the local ports (job names kept)."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    targets = {"frontend": [f"127.0.0.1:{p}" for p in stack.frontend_ports],
               "engine": [f"127.0.0.1:{stack.ports[8001]}"], "worker": [f"127.0.0.1:{stack.ports[8002]}"]}
    jobs = [{"job_name": job["job_name"], "metrics_path": job.get("metrics_path", "/metrics"),
             "static_configs": [{"targets": targets[job["job_name"]]}]}
            for job in config["scrape_configs"] if job["job_name"] in targets]
    assert {j["job_name"] for j in jobs} == set(targets)
    config["scrape_configs"] = jobs
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def prometheus(stack, model_name, tmp_path_factory) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: apt-get install -y prometheus (.ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    _local_prometheus_config(stack, work / "prometheus.yml")
    port = free_port()
    proc = Proc("prometheus", [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                               f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"], work)
    stack.procs["prometheus"] = proc
    load = None
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", [proc], timeout=60)
        load = Load(stack.base, model_name)
        prom = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + LOAD_SECONDS  # queries below run while the load goes on
        while any(_panel_failures(prom, d) for d in DASHBOARDS) and time.monotonic() < deadline:
            time.sleep(1.0)
        assert sum(v for k, v in load.statuses.items() if k == 200) > 5, load.statuses
        yield prom
    finally:
        if load is not None:
            load.close()
        proc.close()


def test_prometheus_scrapes_every_target(prometheus, stack):
    error, result = prometheus.query("up")
    assert error is None
    up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1] for r in result}
    expected = {("frontend", f"127.0.0.1:{p}") for p in stack.frontend_ports}
    expected |= {("engine", f"127.0.0.1:{stack.ports[8001]}"), ("worker", f"127.0.0.1:{stack.ports[8002]}")}
    assert set(up) == expected, up
    down = {k for k, v in up.items() if v != "1"}
    assert not down, f"targets down: {sorted(down)}"


def test_every_service_metric_is_exported_with_model_name(prometheus):
    missing = []
    for name, kind in ALL_METRICS.items():
        series = f"{name}_bucket" if kind == "histogram" else name
        if not prometheus.exists(series):
            missing.append(name)
    assert not missing, f"not exported (or not yet observed): {missing}"
    _, unlabelled = prometheus.query('count by (__name__) ({__name__=~"pagedserve_.+", model_name=""})')
    assert not unlabelled, f"without model_name: {sorted(r['metric']['__name__'] for r in unlabelled)}"
    worker = "|".join(WORKER_METRICS)
    _, no_rank = prometheus.query(f'count by (__name__) ({{__name__=~"({worker}).*", rank=""}})')
    assert not no_rank, f"worker metrics without rank: {sorted(r['metric']['__name__'] for r in no_rank)}"


def _diagnose(prometheus: Prometheus, expr: str) -> str:
    absent = sorted(n for n in metric_names(expr) if not prometheus.exists(n))
    return f"missing series {absent}" if absent else "series exist, but the expression selects nothing"


def _panel_failures(prometheus: Prometheus, dashboard: Path) -> list[str]:
    """The dashboard's panel queries that fail, come back empty, or hold only NaN."""
    failures = []
    for where, expr in dashboard_targets(dashboard):
        promql = grafana_to_promql(expr)
        error, result = prometheus.query(promql)
        if error:
            failures.append(f"{where}: {error}\n    {promql}")
        elif not result:
            failures.append(f"{where}: empty ({_diagnose(prometheus, promql)})\n    {promql}")
        elif all(r["value"][1] == "NaN" for r in result):
            failures.append(f"{where}: only NaN (a rate of a series that did not move?)\n    {promql}")
    return failures


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_panel_returns_data(prometheus, dashboard):
    failures = _panel_failures(prometheus, dashboard)
    assert not failures, f"{len(failures)} empty or failing panel queries:\n" + "\n".join(failures)


def test_alert_rules_evaluate_on_the_live_stack(prometheus):
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    problems = []
    for alert, expr in exprs.items():
        error, _ = prometheus.query(expr)
        if error:
            problems.append(f"{alert}: {error}")
        for name in metric_names(expr):
            if not prometheus.exists(name):
                problems.append(f"{alert}: no series {name}")
        for job in re.findall(r'up\{job="(\w+)"\}', expr):
            if not prometheus.query(f'up{{job="{job}"}}')[1]:
                problems.append(f"{alert}: no target for job {job}")
    # Prometheus itself loaded and evaluates every rule without error.
    body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
    loaded = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    assert set(exprs) <= set(loaded), set(exprs) - set(loaded)
    problems += [f"{name}: {r.get('lastError')}" for name, r in loaded.items() if r.get("health") == "err"]
    # A healthy stack trips none of the availability alerts, not even as pending.
    _, tripped = prometheus.query('ALERTS{alertname=~"PagedserveEngineDown|PagedserveNoFrontendUp|PagedserveWorkerDown"}')
    problems += [f"{r['metric']['alertname']} is {r['metric']['alertstate']} on a healthy stack" for r in tripped]
    assert not problems, "\n".join(problems)
