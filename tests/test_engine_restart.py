"""An engine that dies and comes back: the worker re-joins it (a new handshake, its old request
state dropped) and the frontend serves again, with no process but the engine restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedserve.serve import free_port


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "pagedserve.cli", *args], env=env)


def wait_healthy(base: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(base + "/health", timeout=10).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError("the stack never became healthy")


def complete(base: str, model: str, max_tokens: int = 5) -> dict:
    body = json.dumps(
        {"model": model, "prompt": [11, 12, 13], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    )
    req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))


@pytest.fixture
def processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_worker_and_frontend_rejoin_a_restarted_engine(model_dirs, processes):
    model = str(model_dirs("llama"))
    inp, out, wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    common = ["--model", model, "--max-model-len", "1024", "--served-model-name", "tiny"]
    engine_args = ["engine", *common, "--frontend-input", inp, "--frontend-output", out, "--worker-addr", wrk,
                   "--metrics-port", "0"]
    processes.append(spawn("worker", *common, "--worker-addr", wrk, "--metrics-port", "0"))
    engine = spawn(*engine_args)
    processes.append(engine)
    frontend = ["frontend", "--engine-input", inp, "--engine-output", out, "--port", str(port), "--stall-timeout", "2"]
    processes.append(spawn(*frontend))
    wait_healthy(base)
    before = complete(base, "tiny")["choices"][0]["text"]

    # a long request in flight when the engine dies is answered 503, not left hanging
    with ThreadPoolExecutor(1) as pool:
        lost = pool.submit(complete, base, "tiny", 1000)
        time.sleep(0.3)
        engine.kill()
        engine.wait(10)
        with pytest.raises(urllib.error.HTTPError) as err:
            lost.result(timeout=60)
        assert err.value.code == 503
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/health", timeout=15)
    assert err.value.code == 503

    processes.append(spawn(*engine_args))
    wait_healthy(base)
    after = complete(base, "tiny")
    assert after["choices"][0]["text"] == before  # the same greedy output from the rejoined worker
    assert after["usage"]["completion_tokens"] == 5
    assert all(p.poll() is None for p in processes[:1] + processes[2:])  # worker and frontend never restarted
