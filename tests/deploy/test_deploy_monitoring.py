"""A real Prometheus scrapes the compose stack run as local processes (local_stack.py) with the
repository's job names and alert rules while load runs through nginx: every target is up, every
service metric is exported with its labels, and every dashboard query and alert rule is evaluated
through its HTTP API."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import (
    ALL_METRICS,
    DASHBOARDS,
    MONITORING,
    WORKER_METRICS,
    dashboard_targets,
    find_binary,
    grafana_to_promql,
    metric_names,
)
from deploy_procs import Proc, wait_http
from local_stack import LocalStack, complete

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(300)

PROMETHEUS = find_binary("prometheus")
# Seconds of load at most before the queries run: until then, the fixture waits for every dashboard
# panel to have data (a rate needs two scrapes in its 15s window), not a fixed time.
LOAD_SECONDS = 45.0


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
            resp = complete(client, self.base, self.model, i, max_tokens=12)
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
