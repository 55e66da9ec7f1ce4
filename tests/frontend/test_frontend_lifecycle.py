"""Frontend lifecycle against the real engine and worker: starting before the engine, an engine
that hangs (SIGSTOP), several frontends on one port (one joining under load), SIGTERM (drained,
also past the shutdown timeout), and the engine client's own robustness: a message that cannot be
sent fails its request alone, a task that ends takes the process down, and a peer that knows the
public frontend id cannot read its outputs. (An engine restart mid-request: tests/test_recovery.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from e2e_stack import Stack
from frontend_helpers import REPO, metric_value, wait_until
from msgspec.structs import force_setattr

from pagedserve.serve import free_port
from services.frontend.engine_client import EngineClient
from shared.protocol import EngineMessage, FrontendMessage, RequestDelta, RequestFailed
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue

pytestmark = pytest.mark.timeout(120)

# Greedy and ignoring EOS, so every answer runs to max_tokens ("length").
BODY = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
LONG = {**BODY, "max_tokens": 1000}  # seconds of work


def test_engine_late_and_hung(make_stack):
    stack: Stack = make_stack()
    base = stack.base
    # No waiting for a silent engine to come back: a hung one fails its requests at once.
    proc = stack.start_frontend("fe-life", "--health-timeout", "5", "--stall-timeout", "1", "--resume-timeout", "0")
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
    page = httpx.get(f"{base}/metrics").text
    # Refused before the engine was known (so before the model name was): not a generation request.
    assert metric_value(page, "pagedserve_frontend_http_responses_total", model_name="unknown",
                        endpoint="/v1/completions", status="503") == 1
    # The hung engine's 503 came after admission: an error.
    requests = {r: metric_value(page, "pagedserve_frontend_requests_total", model_name=model, finish_reason=r)
                for r in ("stop", "length", "abort", "error")}
    assert requests == {"stop": 0, "length": 2, "abort": 0, "error": 1}
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
        resp=httpx.post(f"{base}/v1/completions", json=LONG, timeout=120)))
    thread.start()
    stack.wait_engine_busy()
    assert proc.terminate(timeout=90) == 0, proc.log()
    thread.join(60)
    assert result["resp"].status_code == 200
    assert result["resp"].json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    # The engine heard the Goodbye: it no longer counts the frontend, and holds nothing of it.
    deadline = time.monotonic() + 5
    while _connected_frontends(stack) != connected - 1:
        assert time.monotonic() < deadline, "the engine never heard the frontend's Goodbye"
        time.sleep(0.05)
    stack.wait_engine_idle(5.0)


def _unchecked(**fields) -> SamplingParams:
    """Params with values their validation (and the HTTP layer's) rejects: the client must
    survive them all the same."""
    params = SamplingParams(max_tokens=3)
    for name, value in fields.items():
        force_setattr(params, name, value)
    return params


async def _run_client(stack: Stack) -> list[RequestFailed | tuple[list[int], str]]:
    """Through a real EngineClient: two requests whose AddRequest cannot be encoded (an integer
    beyond 64 bits, a lone surrogate), then a valid one; for each, its failure or (tokens, finish)."""
    client = EngineClient(stack.inp, stack.out, "fe-direct")
    await client.start()
    try:
        await client.wait_ready(60)
        bad = [_unchecked(seed=2**70), _unchecked(stop=["\ud800"])]
        got: list[RequestFailed | tuple[list[int], str]] = []
        for i, params in enumerate([*bad, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)]):
            queue = client.register([f"r{i}"])
            client.add_request(f"r{i}", [11, 12, 13], params)
            tokens: list[int] = []
            while isinstance(item := await asyncio.wait_for(queue.get(), 30), RequestDelta):
                tokens += item.new_token_ids
                if item.finish_reason is not None:
                    item = (tokens, item.finish_reason)
                    break
            client.release([f"r{i}"])
            got.append(item)
        return got
    finally:
        await client.close()


def test_a_message_that_cannot_be_sent_fails_its_request_alone(stack):
    first, second, good = asyncio.run(_run_client(stack))
    for failed in (first, second):
        assert isinstance(failed, RequestFailed) and failed.status == 400, failed
        assert failed.message.startswith("The request cannot be sent to the engine")
    assert isinstance(good, tuple) and len(good[0]) == 3 and good[1] == "length"


_LOSE_A_TASK = """
import asyncio, sys
from services.frontend.engine_client import EngineClient

async def main():
    client = EngineClient(sys.argv[1], sys.argv[2], "fe-doomed")
    await client.start()
    next(t for t in asyncio.all_tasks() if t.get_name() == "engine-send").cancel()
    await asyncio.sleep(30)

asyncio.run(main())
"""


def test_a_background_task_that_ends_takes_the_process_down():
    """So its supervisor restarts it, instead of leaving it up with no way to the engine."""
    addrs = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    done = subprocess.run([sys.executable, "-c", _LOSE_A_TASK, *addrs], check=False, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 70, done.stderr
    assert "the engine-send task ended" in done.stderr


def test_the_public_frontend_id_cannot_read_its_outputs(stack):
    import zmq

    port = free_port()
    proc = stack.start_frontend("fe-public", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=60)
    ctx = zmq.Context()
    # A peer that takes the id clients see in x-pagedserve-frontend as its routing identity.
    spy = DealerQueue(ctx, stack.out, EngineMessage, FrontendMessage, identity=b"fe-public")
    try:
        time.sleep(0.2)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=BODY, timeout=30)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        assert resp.headers["x-pagedserve-frontend"] == "fe-public"
        assert spy.recv(timeout_ms=1000) is None
    finally:
        spy.close()
        ctx.term()
    assert proc.terminate() == 0


def _stream_events(url: str, body: dict, started: threading.Event, events: list[str]) -> None:
    """The data lines of a streamed completion, into ``events``; ``started`` after the first."""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()


def test_sigterm_past_the_shutdown_timeout_ends_requests_with_an_error(stack, backend):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = stack.start_frontend("fe-short", "--shutdown-timeout", "0.5", port=port)
    wait_until(f"{base}/health", proc, timeout=60)
    started, events, result = threading.Event(), [], {}
    streaming = threading.Thread(target=_stream_events, args=(f"{base}/v1/completions", LONG, started, events))
    whole = threading.Thread(target=lambda: result.update(
        resp=httpx.post(f"{base}/v1/completions", json=LONG, timeout=60)))
    streaming.start()
    whole.start()
    assert started.wait(30)
    wait_for_in_flight(stack, "fe-short", 2)  # both admitted before the SIGTERM
    worker = next(p for p in backend.procs if p.log_path.stem == "worker").popen.pid
    os.kill(worker, signal.SIGSTOP)  # no token comes, so neither can finish within the timeout
    try:
        assert proc.terminate() == 0, proc.log()
        streaming.join(30)
        whole.join(30)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"].startswith("The frontend is shutting down") and error["type"] == "service_unavailable_error"
    assert sum(1 for e in events[:-2] if json.loads(e)["choices"][0]["text"]) < LONG["max_tokens"]
    assert result["resp"].status_code == 503
    assert result["resp"].json()["error"]["message"].startswith("The frontend is shutting down")
    stack.wait_engine_idle(5.0)  # both were aborted in the engine


def test_heartbeats_keep_an_idle_frontend_known_to_the_engine(model_path, tmp_path):
    stack = Stack(model_path, tmp_path)
    try:
        stack.start_worker()
        stack.start_engine("engine", "--frontend-timeout", "2")
        proc = stack.start_frontend("fe-idle")
        wait_until(f"{stack.base}/health", proc, timeout=120)
        time.sleep(5)  # idle for longer than the engine's frontend timeout
        assert _connected_frontends(stack) == 1
        os.kill(proc.popen.pid, signal.SIGSTOP)  # silent: the engine counts it as gone
        try:
            deadline = time.monotonic() + 15
            while _connected_frontends(stack) != 0:
                assert time.monotonic() < deadline, "the engine never noticed the silent frontend"
                time.sleep(0.2)
        finally:
            os.kill(proc.popen.pid, signal.SIGCONT)
        resp = httpx.post(f"{stack.base}/v1/completions", json=BODY, timeout=60)  # heard again: it serves
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        assert _connected_frontends(stack) == 1
    finally:
        stack.close()


def wait_for_in_flight(stack: Stack, frontend_id: str, count: int, timeout: float = 30.0) -> None:
    """Until the frontend serves ``count`` generation requests (its in-flight gauge)."""
    deadline = time.monotonic() + timeout
    while metric_value(stack.metrics(frontend_id), "pagedserve_frontend_requests_in_flight") < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests in flight after {timeout}s"
        time.sleep(0.05)
