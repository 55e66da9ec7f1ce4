"""Frontend lifecycle against the scripted engine: starting before the engine, an engine that
hangs or restarts, several frontends on one port (one joining under load), and SIGTERM."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fake_engine import FakeEngine
from frontend_helpers import free_port, metric_value, wait_until

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "fake-model", "prompt": "Hello", "max_tokens": 3}


def _addrs() -> SimpleNamespace:
    return SimpleNamespace(input_addr=f"tcp://127.0.0.1:{free_port()}", output_addr=f"tcp://127.0.0.1:{free_port()}")


def _engine(tokenizer_dir, tokenizer, addrs: SimpleNamespace) -> FakeEngine:
    script = tokenizer.encode(" one two three four five six seven eight nine ten.")
    return FakeEngine(str(tokenizer_dir), script, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      input_addr=addrs.input_addr, output_addr=addrs.output_addr)


def test_engine_late_hung_and_restarted(tokenizer_dir, tokenizer, start_frontend):
    addrs, port = _addrs(), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_frontend(port, addrs, "--health-timeout", "1", "--stall-timeout", "1")
    resp = wait_until(f"{base}/health", proc, status=503)
    assert resp.json()["error"]["code"] == "engine_unavailable"
    resp = httpx.post(f"{base}/v1/completions", json=BODY)
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable_error"

    with _engine(tokenizer_dir, tokenizer, addrs) as engine:  # the engine starts late: the frontend joins
        wait_until(f"{base}/health", proc, timeout=20)
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
        engine.paused.set()  # hung: no steps, no pongs
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        start = time.monotonic()
        resp = httpx.post(f"{base}/v1/completions", json=BODY, timeout=20)
        assert resp.status_code == 503 and time.monotonic() - start < 10
        engine.paused.clear()
        wait_until(f"{base}/health", proc, timeout=10)
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
        engine.step_s = 0.05  # a long request is running when the engine goes away
        result: dict = {}
        inflight = threading.Thread(target=lambda: result.update(
            resp=httpx.post(f"{base}/v1/completions", json={**BODY, "max_tokens": 100}, timeout=30)))
        inflight.start()
        n_added = len(engine.added)
        assert engine.wait_for(lambda: len(engine.added) > n_added)

    with _engine(tokenizer_dir, tokenizer, addrs):  # a restarted engine on the same addresses
        wait_until(f"{base}/health", proc, timeout=20)
        inflight.join(30)
        assert result["resp"].status_code == 503 and "lost" in result["resp"].json()["error"]["message"]
        assert httpx.post(f"{base}/v1/completions", json=BODY).json()["choices"][0]["text"]
    page = httpx.get(f"{base}/metrics").text
    # Refused before the engine was known (so before the model name was): not a generation request.
    assert metric_value(page, "pagedserve_frontend_http_responses_total", model_name="unknown",
                        endpoint="/v1/completions", status="503") == 1
    # The hung engine's and the lost request's 503s came after admission: errors.
    requests = {r: metric_value(page, "pagedserve_frontend_requests_total", model_name="fake-model", finish_reason=r)
                for r in ("stop", "length", "abort", "error")}
    assert requests == {"stop": 0, "length": 3, "abort": 0, "error": 2}
    assert metric_value(page, "pagedserve_frontend_requests_in_flight", model_name="fake-model") == 0


def _load(base: str, stop: threading.Event, errors: list[str], served: list[str]) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            resp = http.post(f"{base}/v1/completions", json={**BODY, "max_tokens": 20})
            if resp.status_code != 200:
                errors.append(resp.text)
            served.append(resp.headers.get("x-pagedserve-frontend", ""))


def test_two_frontends_share_a_port_one_joining_under_load(fake_engine, start_frontend):
    port, m1, m2 = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    first = start_frontend(port, fake_engine, "--metrics-port", str(m1), "--frontend-id", "fe-one")
    wait_until(f"{base}/health", first)
    stop, errors, served = threading.Event(), [], []
    loaders = [threading.Thread(target=_load, args=(base, stop, errors, served)) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        second = start_frontend(port, fake_engine, "--metrics-port", str(m2), "--frontend-id", "fe-two")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                page = httpx.get(f"http://127.0.0.1:{m2}/metrics").text
                if metric_value(page, "pagedserve_frontend_engine_ready") == 1:
                    break
            except httpx.HTTPError:
                pass
            assert second.popen.poll() is None, second.log()
            time.sleep(0.1)
        seen = {httpx.post(f"{base}/v1/completions", json=BODY).headers["x-pagedserve-frontend"] for _ in range(40)}
        assert seen == {"fe-one", "fe-two"}
    finally:
        stop.set()
        for t in loaders:
            t.join(30)
    assert not errors and served
    for mport, fid in ((m1, "fe-one"), (m2, "fe-two")):
        page = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
        assert metric_value(page, "pagedserve_frontend_info", frontend_id=fid) == 1
        assert metric_value(page, "pagedserve_frontend_http_responses_total", endpoint="/v1/completions", status="200") > 0


def test_sigterm_finishes_open_requests_and_says_goodbye(fake_engine, start_frontend):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_frontend(port, fake_engine, "--frontend-id", "fe-leaving")
    wait_until(f"{base}/health", proc)
    result: dict = {}
    old, fake_engine.step_s = fake_engine.step_s, 0.02
    try:
        thread = threading.Thread(target=lambda: result.update(
            resp=httpx.post(f"{base}/v1/completions", json={**BODY, "max_tokens": 30}, timeout=30)))
        thread.start()
        assert fake_engine.wait_for(lambda: any(a.req_id.startswith("fe-leaving") for a in fake_engine.added))
        assert proc.terminate() == 0, proc.log()
        thread.join(30)
    finally:
        fake_engine.step_s = old
    assert result["resp"].status_code == 200 and result["resp"].json()["usage"]["completion_tokens"] == 30
    assert "fe-leaving" in fake_engine.goodbyes
