"""The engine and its frontends as real processes: a frontend killed mid-generation loses its
requests and their KV blocks, a full queue answers 503 over HTTP, and the priority policy runs
the waiting request with the lowest priority value first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_helpers import scrape, stop_processes
from test_engine_service import Client, engine_stack

from pagedserve.serve import free_port
from services.engine import frontends
from services.engine.frontends import Frontends
from shared.protocol import AddRequest, Outputs
from shared.sampling_params import SamplingParams

ENGINE_FLAGS = (
    "--frontend-timeout", "3", "--max-num-seqs", "1", "--max-num-queued-requests", "2", "--scheduling-policy", "priority",
)


@pytest.fixture(scope="module")
def stack(model_dirs):
    with engine_stack(str(model_dirs("llama")), *ENGINE_FLAGS, max_model_len=1024) as started:
        yield started


def start_frontend(inp: str, out: str) -> tuple[subprocess.Popen, str]:
    """A frontend process on the engine; returns it and its base URL once /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedserve.cli", "frontend", "--engine-input", inp, "--engine-output", out,
           "--port", str(port), "--metrics-port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(base), 120, "the frontend never became healthy")
    return proc, base


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def test_a_killed_frontend_loses_its_requests_and_their_blocks(stack):
    _, inp, out, procs, (engine_port, _) = stack
    frontend, base = start_frontend(inp, out)
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            wait_for(lambda: scrape(engine_port)["pagedserve_engine_requests_running"] == 1, 60, "it never ran")
            before = scrape(engine_port)
            frontend.send_signal(signal.SIGKILL)  # no Goodbye: the engine only hears silence
    finally:
        frontend.kill()
        frontend.wait(10)
    assert before["pagedserve_engine_connected_frontends"] == 1
    assert before["pagedserve_engine_kv_cache_usage_ratio"] > 0

    def freed() -> bool:
        m = scrape(engine_port)
        gone = m["pagedserve_engine_connected_frontends"] == 0 and m["pagedserve_engine_requests_running"] == 0
        return gone and m["pagedserve_engine_kv_cache_usage_ratio"] == 0.0

    wait_for(freed, 60, "the engine kept the killed frontend's request")
    assert all(p.poll() is None for p in procs)


def test_a_full_queue_answers_503_and_the_accepted_requests_complete(stack):
    _, inp, out, _procs, (engine_port, _) = stack
    frontend, base = start_frontend(inp, out)
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 40, "ignore_eos": True}
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{base}/v1/completions", json=body, timeout=120), range(12)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 503}, statuses
        for answer in answers:
            if answer.status_code == 200:
                assert answer.json()["usage"]["completion_tokens"] == 40
            else:
                error = answer.json()["error"]
                assert "queue is full" in error["message"] and answer.headers.get("retry-after")
        metrics = scrape(engine_port)
        assert metrics["pagedserve_engine_rejected_requests_total"] == statuses.count(503)
        # every accepted request left the queue once, some after waiting behind another
        assert metrics["pagedserve_engine_request_queue_time_seconds_count"] >= statuses.count(200)
        assert metrics["pagedserve_engine_request_queue_time_seconds_sum"] > 0
        assert metrics["pagedserve_engine_oldest_waiting_seconds"] == 0.0  # nothing waits now
        # the engine serves on once the burst is over
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
    finally:
        stop_processes([frontend])


def test_a_request_larger_than_the_queue_is_400_not_503(stack):
    """More sequences (n x prompts) than --max-num-queued-requests (2 here) could never be
    admitted: a 400 naming n, not a 503 the SDK would retry in vain; exactly the limit is served."""
    _, inp, out, _procs, (engine_port, _) = stack
    frontend, base = start_frontend(inp, out)
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        rejected = scrape(engine_port)["pagedserve_engine_rejected_requests_total"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
        for too_many in ({"n": 3}, {"n": 2, "prompt": ["Hello", "Hi"]}):
            answer = httpx.post(f"{base}/v1/completions", json=body | too_many, timeout=120)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == "n" and "queues at most 2" in error["message"]
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 3}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120).status_code == 400
        served = httpx.post(f"{base}/v1/completions", json=body | {"n": 2}, timeout=120)
        assert served.status_code == 200 and len(served.json()["choices"]) == 2
        assert scrape(engine_port)["pagedserve_engine_rejected_requests_total"] == rejected
    finally:
        stop_processes([frontend])


def test_the_priority_policy_runs_the_lowest_value_first(stack):
    _, inp, out, _procs, _ports = stack
    client = Client(inp, out)
    client.hello()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt = np.array([7, 8, 9], np.int32)
    client.tx.send(AddRequest("running", prompt, params))  # one sequence at a time: the others wait
    while not isinstance(msg := client.rx.recv(timeout_ms=30_000), Outputs):
        assert msg is not None
    client.tx.send(AddRequest("low", prompt, params, priority=5))
    client.tx.send(AddRequest("high", prompt, params, priority=-1))
    firsts: list[str] = []
    deadline = time.monotonic() + 120
    while len(firsts) < 2 and time.monotonic() < deadline:
        client.beat()
        msg = client.rx.recv(timeout_ms=1000)
        if isinstance(msg, Outputs):
            firsts += [d.req_id for d in msg.deltas if d.req_id in ("low", "high") and d.req_id not in firsts]
    assert firsts == ["high", "low"]
    client.close()


def test_the_frontend_table_tracks_liveness_and_ownership(monkeypatch):
    now = [100.0]  # the table's clock, moved by hand: no sleeping, nothing for a busy machine to stretch
    monkeypatch.setattr(frontends, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    with pytest.raises(ValueError, match="heartbeat interval"):
        Frontends(0.5)
    table = Frontends(1.2)
    assert table.seen(b"a") and not table.seen(b"a")  # registered once
    assert not table.seen(b"probe", register=False) and len(table) == 1  # a Ping alone is no frontend
    table.claim("r1", b"a")
    with pytest.raises(ValueError, match="already in use"):
        table.claim("r1", b"b")
    assert table.owned_by(b"b", ["r1"]) == [] and table.owned_by(b"a", ["r1", "x"]) == ["r1"]
    now[0] += 0.7
    table.seen(b"b")
    now[0] += 0.7
    assert table.silent() == [b"a"]  # "b" spoke 0.7 s ago
    assert table.leave(b"a") == ["r1"] and len(table) == 1


def test_a_request_before_hello_is_dropped_and_runs_once_resubmitted(stack):
    """An AddRequest can sit in a frontend's socket while the engine restarts and reach the new
    engine before the frontend's output connection: the engine takes requests only after Hello."""
    _model, inp, out, _procs, _ports = stack
    prompt = np.arange(5, 12, dtype=np.int32)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    with Client(inp, out) as client:
        client.tx.send(AddRequest("early", prompt, params))
        assert client.collect({"early"}, timeout_s=3) == {"early": (None, [])}  # never ran
        client.hello()
        client.tx.send(AddRequest("early", prompt, params))  # the id was never taken
        finish, tokens = client.collect({"early"})["early"]
        assert finish == "length" and len(tokens) == 3


def test_the_greeted_set_is_bounded_by_live_frontends(monkeypatch):
    monkeypatch.setattr("services.engine.frontends.MAX_GREETED", 2)
    table = Frontends(1.2)
    for identity in (b"a", b"b"):
        table.seen(identity)
        table.greet(identity)
    table.leave(b"a")  # silent: it stays greeted while there is room
    assert table.greeted == {b"a", b"b"}
    table.seen(b"c")
    table.greet(b"c")  # full: the frontends no longer live make room
    assert table.greeted == {b"b", b"c"}
