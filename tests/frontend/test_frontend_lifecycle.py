"""Frontend lifecycle against the real engine and worker: starting before the engine, an engine
that hangs (SIGSTOP) or restarts (killed, then started again on the same addresses; the worker
rejoins it), several frontends on one port (one joining under load), and SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from e2e_stack import Stack
from frontend_helpers import metric_value, wait_until

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(120)

# Greedy and ignoring EOS, so every answer runs to max_tokens ("length").
BODY = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
LONG = {**BODY, "max_tokens": 1000}  # seconds of work


def test_engine_late_hung_and_restarted(make_stack):
    stack: Stack = make_stack()
    base = stack.base
    # A restarted engine must answer the in-flight request's ping (sent after the stall timeout)
    # within the health timeout for the request to be reported lost; it starts in a few seconds.
    proc = stack.start_frontend("fe-life", "--health-timeout", "5", "--stall-timeout", "1")
    resp = wait_until(f"{base}/health", proc, status=503)
    assert resp.json()["error"]["code"] == "engine_unavailable"
    resp = httpx.post(f"{base}/v1/completions", json=BODY)
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable_error"

    stack.start_worker()  # the engine starts late: the frontend joins
    engine = stack.start_engine()
    wait_until(f"{base}/health", proc, timeout=60)
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200

    os.kill(engine.popen.pid, signal.SIGSTOP)  # hung: no steps, no pongs
    try:
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        start = time.monotonic()
        resp = httpx.post(f"{base}/v1/completions", json=BODY, timeout=20)
        assert resp.status_code == 503 and time.monotonic() - start < 10
    finally:
        os.kill(engine.popen.pid, signal.SIGCONT)
    wait_until(f"{base}/health", proc, timeout=10)
    assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200

    result: dict = {}  # a long request is running when the engine goes away
    inflight = threading.Thread(target=lambda: result.update(
        resp=httpx.post(f"{base}/v1/completions", json=LONG, timeout=60)))
    inflight.start()
    stack.wait_engine_busy()
    engine.popen.kill()
    engine.popen.wait(10)
    stack.start_engine("engine-restarted")  # on the same addresses
    wait_until(f"{base}/health", proc, timeout=60)
    inflight.join(60)
    assert result["resp"].status_code == 503, result["resp"].text
    assert "lost" in result["resp"].json()["error"]["message"]
    assert httpx.post(f"{base}/v1/completions", json=BODY).json()["choices"][0]["text"]
    page = httpx.get(f"{base}/metrics").text
    # Refused before the engine was known (so before the model name was): not a generation request.
    assert metric_value(page, "pagedserve_frontend_http_responses_total", model_name="unknown",
                        endpoint="/v1/completions", status="503") == 1
    # The hung engine's and the lost request's 503s came after admission: errors.
    requests = {r: metric_value(page, "pagedserve_frontend_requests_total", model_name=model, finish_reason=r)
                for r in ("stop", "length", "abort", "error")}
    assert requests == {"stop": 0, "length": 3, "abort": 0, "error": 2}
    assert metric_value(page, "pagedserve_frontend_requests_in_flight", model_name=model) == 0


def _load(base: str, stop: threading.Event, errors: list[str], served: list[str]) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            resp = http.post(f"{base}/v1/completions", json={**BODY, "max_tokens": 20})
            if resp.status_code != 200:
                errors.append(resp.text)
            served.append(resp.headers.get("x-pagedserve-frontend", ""))


def test_two_frontends_share_a_port_one_joining_under_load(stack):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = stack.start_frontend("fe-one", port=port)
    wait_until(f"{base}/health", first, timeout=60)
    stop, errors, served = threading.Event(), [], []
    loaders = [threading.Thread(target=_load, args=(base, stop, errors, served)) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        second = stack.start_frontend("fe-two", port=port)
        stack.wait_frontend_ready("fe-two", second, timeout=30)
        seen = {httpx.post(f"{base}/v1/completions", json=BODY).headers["x-pagedserve-frontend"] for _ in range(40)}
        assert seen == {"fe-one", "fe-two"}
    finally:
        stop.set()
        for t in loaders:
            t.join(30)
    assert not errors and served
    for fid in ("fe-one", "fe-two"):
        page = stack.metrics(fid)
        assert metric_value(page, "pagedserve_frontend_info", frontend_id=fid) == 1
        assert metric_value(page, "pagedserve_frontend_http_responses_total", endpoint="/v1/completions", status="200") > 0


def _connected_frontends(stack: Stack) -> float:
    return stack.engine_metric("pagedserve_engine_connected_frontends")


def test_sigterm_finishes_open_requests_and_says_goodbye(stack):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = stack.start_frontend("fe-leaving", "--shutdown-timeout", "60", port=port)
    wait_until(f"{base}/health", proc, timeout=60)
    connected = _connected_frontends(stack)
    assert connected >= 1
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        resp=httpx.post(f"{base}/v1/completions", json=LONG, timeout=60)))
    thread.start()
    stack.wait_engine_busy()
    assert proc.terminate() == 0, proc.log()
    thread.join(60)
    assert result["resp"].status_code == 200
    assert result["resp"].json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    # The engine heard the Goodbye: it no longer counts the frontend, and holds nothing of it.
    deadline = time.monotonic() + 5
    while _connected_frontends(stack) != connected - 1:
        assert time.monotonic() < deadline, "the engine never heard the frontend's Goodbye"
        time.sleep(0.05)
    stack.wait_engine_idle(5.0)
