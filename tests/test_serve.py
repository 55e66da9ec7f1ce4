"""`pagedserve serve`: starts the stack, reports readiness, drains on SIGTERM (open streams finish,
or end with an error event at the shutdown timeout; then every child stops and serve exits 0).
Replicas restarted, and a dead frontend: test_serve_restart.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from service_helpers import sse_events

from pagedserve.serve import free_port


def start_serve(model: str, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "pagedserve.cli", "serve", model, "--port", str(port), "--frontends", "2",
        "--max-model-len", "256", "--engine-metrics-port", str(free_port()), "--worker-metrics-port", str(free_port()),
        "--frontend-metrics-port", "0", "--ready-timeout", "120", *extra,
    ]
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING", **(env or {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_line(proc: subprocess.Popen, needle: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"serve never printed {needle!r} (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def children(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def check_serving(proc: subprocess.Popen, port: int, line: str) -> None:
    """serve announced its address, runs its children and answers, and passed its request limits
    (--max-n 2) on to every frontend (they share the port)."""
    assert f"http://127.0.0.1:{port}/v1" in line
    assert len(children(proc)) >= 4  # engine, worker, two frontends
    model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
    status, out = _post(port, {"model": model, "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
    assert status == 200 and out["usage"]["completion_tokens"] == 4
    for _ in range(6):
        status, out = _post(port, {"model": model, "prompt": "hello", "max_tokens": 2, "n": 3})
        assert status == 400 and out["error"]["param"] == "n", out


def serving(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
    except OSError:  # refused, or an HTTP error status
        return False


def sigterm_mid_stream(model: str, shutdown_timeout: str) -> list[str]:
    """Serve (check_serving), open a long stream, SIGTERM serve once tokens flow: the stream's
    events, after checking that the frontends stopped taking requests and that serve and its
    children exited 0."""
    port = free_port()
    proc = start_serve(model, port, "--max-model-len", "1024", "--shutdown-timeout", shutdown_timeout, "--max-n", "2")
    try:
        check_serving(proc, port, wait_line(proc, "serving"))
        kids = children(proc)
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            pending = pool.submit(sse_events, f"http://127.0.0.1:{port}/v1/completions", body, started)
            assert started.wait(120)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while serving(port):  # the frontends stop taking requests at once
                assert time.monotonic() < deadline, "the frontends still take requests"
                time.sleep(0.1)
            events = pending.result(timeout=180)
        assert proc.wait(60) == 0
        _, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive
        return events
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_lets_open_streams_finish(model_dirs):
    events = sigterm_mid_stream(str(model_dirs("llama")), "120")
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 1000
    assert not any("error" in json.loads(e) for e in events[:-1])


def test_sigterm_past_the_shutdown_timeout_ends_streams_with_an_error(model_dirs):
    # 1000 tokens cannot stream in 50 ms; in 0.5 s they did, on a fast machine
    events = sigterm_mid_stream(str(model_dirs("llama")), "0.05")
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"].startswith("The frontend is shutting down") and error["type"] == "service_unavailable_error"


if __name__ == "__main__":
    pytest.main([__file__])
