"""The compose stack run as local processes (local_stack.py, the `stack` fixture in conftest.py):
nginx balances across both frontends and streams through, each frontend counts the responses it
served, the engine's links refuse a peer without the CURVE keys, and every service's compose
healthcheck passes. A real Prometheus on the stack is in test_deploy_monitoring.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
import zmq
from local_stack import complete
from prometheus_client.parser import text_string_to_metric_families

from shared.protocol import EngineMessage, EngineToWorker, FrontendMessage, Hello, WorkerReady, WorkerToEngine
from shared.transport import DealerQueue

pytestmark = pytest.mark.timeout(300)


def test_nginx_balances_across_both_frontends(stack, model_name):
    answered_by = Counter()
    with httpx.Client() as client:
        for i in range(20):
            resp = complete(client, stack.base, model_name, i)
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
            assert complete(client, stack.base, model_name, i).status_code == 200
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
