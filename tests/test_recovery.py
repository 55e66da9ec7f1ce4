"""Services that die or hang and come back, as real processes.

A worker started with settings other than the engine's is turned away with the reason. An
engine killed mid-request and started again: the worker re-joins it (a new handshake, its old
request state dropped), the frontend resubmits what it had in flight, and every request finishes
with exactly the text of an undisturbed run, with no process but the engine restarted; an engine
that does not come back within the frontend's --resume-timeout ends the requests with an error.
A worker that hangs or dies mid-request: the engine counts it as lost after its heartbeat timeout,
/health says 503, and when the worker is back (the same process resumed, or a new one) every
request in flight finishes with exactly the tokens it would have had."""

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
from dataclasses import dataclass

import pytest
from service_helpers import scrape, sse_events

from pagedserve.serve import free_port


def spawn(*args: str, env_extra: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "pagedserve.cli", *args], env=env, **popen_kwargs)


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


def wait_status(base: str, status: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = urllib.request.urlopen(base + "/health", timeout=10).status
        except urllib.error.HTTPError as exc:
            got = exc.code
        if got == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"/health never answered {status}")


def complete(base: str, model: str, max_tokens: int = 5) -> dict:
    body = json.dumps(
        {"model": model, "prompt": [11, 12, 13], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    )
    req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=180))


def stream_events(base: str, model: str, max_tokens: int, started: threading.Event) -> list[str]:
    """The data payloads of a streamed greedy completion; `started` is set after a few chunks."""
    body = {"model": model, "prompt": [11, 12, 13], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return sse_events(base + "/v1/completions", body, started)


def stream(base: str, model: str, max_tokens: int, started: threading.Event) -> tuple[str, str]:
    """A streamed greedy completion that must end normally: (text, finish reason)."""
    events = stream_events(base, model, max_tokens, started)
    assert events[-1] == "[DONE]", events[-3:]
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    return "".join(c["text"] for c in choices), next(c["finish_reason"] for c in reversed(choices) if c["finish_reason"])


@dataclass
class StackCommands:
    base: str  # the frontend's URL
    worker: list[str]
    engine: list[str]
    frontend: list[str]


def stack_commands(model: str, *engine_flags: str) -> StackCommands:
    inp, out, wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    port = free_port()
    common = ["--model", model, "--max-model-len", "1024", "--served-model-name", "tiny"]
    return StackCommands(
        f"http://127.0.0.1:{port}",
        ["worker", *common, "--worker-addr", wrk, "--metrics-port", "0"],
        ["engine", *common, "--frontend-input", inp, "--frontend-output", out, "--worker-addr", wrk, *engine_flags],
        ["frontend", "--engine-input", inp, "--engine-output", out, "--port", str(port)],
    )


def kill_paused(engine: subprocess.Popen, worker: subprocess.Popen) -> None:
    """Kill the engine with its worker stopped meanwhile, so the requests in flight cannot finish
    between the test seeing tokens and the kill (on a fast machine they might)."""
    worker.send_signal(signal.SIGSTOP)
    try:
        engine.kill()
        engine.wait(10)
    finally:
        worker.send_signal(signal.SIGCONT)


@pytest.fixture
def processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_requests_resume_on_a_restarted_engine(model_dirs, processes):
    cmd = stack_commands(str(model_dirs("llama")), "--metrics-port", "0")
    base = cmd.base
    processes.append(spawn(*cmd.worker))
    engine = spawn(*cmd.engine)
    processes.append(engine)
    processes.append(spawn(*cmd.frontend, "--stall-timeout", "1", "--resume-timeout", "120"))
    wait_healthy(base)
    expected = complete(base, "tiny", 400)["choices"][0]  # undisturbed
    assert expected["finish_reason"] == "length"
    late_expected = complete(base, "tiny", 20)["choices"][0]  # the late request below, undisturbed

    # a stream and a whole completion in flight when the engine dies, one more request sent while
    # it is down (its message waits in the socket and reaches the new engine too), and a new
    # engine takes over
    started = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        streamed = pool.submit(stream, base, "tiny", 400, started)
        whole = pool.submit(complete, base, "tiny", 400)
        assert started.wait(60)  # tokens are flowing
        kill_paused(engine, processes[0])
        wait_status(base, 503)
        assert not streamed.done() and not whole.done()
        late = pool.submit(complete, base, "tiny", 20)
        time.sleep(1)
        processes.append(spawn(*cmd.engine))
        assert streamed.result(timeout=180) == (expected["text"], "length")
        got = whole.result(timeout=180)
        # sent while the engine was down, its AddRequest waits in the socket and can reach the
        # new engine before the frontend's output connection: the engine drops it until the
        # frontend's Hello, after which it is resubmitted and runs whole
        late_choice = late.result(timeout=180)["choices"][0]
        assert (late_choice["text"], late_choice["finish_reason"]) == (late_expected["text"], "length")
    assert (got["choices"][0]["text"], got["choices"][0]["finish_reason"]) == (expected["text"], "length")
    assert got["usage"]["completion_tokens"] == 400
    wait_healthy(base)
    assert all(p.poll() is None for p in processes[:1] + processes[2:])  # worker and frontend never restarted


def seeded_stream(base: str, max_tokens: int, started: threading.Event) -> tuple[str, list[str], str]:
    """A streamed, seeded completion at temperature 1.0: (text, its tokens, finish reason)."""
    body = {
        "model": "tiny", "prompt": [11, 12, 13], "max_tokens": max_tokens, "temperature": 1.0, "seed": 77,
        "ignore_eos": True, "logprobs": 0,
    }
    events = sse_events(base + "/v1/completions", body, started)
    assert events[-1] == "[DONE]", events[-3:]
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    tokens = [t for c in choices if c.get("logprobs") for t in c["logprobs"]["tokens"]]
    return "".join(c["text"] for c in choices), tokens, choices[-1]["finish_reason"]


def test_a_seeded_stream_resumes_on_a_restarted_engine_token_for_token(model_dirs, processes):
    cmd = stack_commands(str(model_dirs("llama")), "--metrics-port", "0")
    engine = spawn(*cmd.engine)
    processes.extend([spawn(*cmd.worker), engine, spawn(*cmd.frontend, "--stall-timeout", "1")])
    wait_healthy(cmd.base)
    expected = seeded_stream(cmd.base, 300, threading.Event())  # undisturbed
    assert expected[2] == "length" and len(expected[1]) == 300
    assert expected[0] != complete(cmd.base, "tiny", 300)["choices"][0]["text"]  # sampled, not greedy
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(seeded_stream, cmd.base, 300, started)
        assert started.wait(60)  # tokens are flowing
        kill_paused(engine, processes[0])
        wait_status(cmd.base, 503)
        assert not pending.done()
        processes.append(spawn(*cmd.engine))
        assert pending.result(timeout=180) == expected


def test_requests_end_with_an_error_when_the_engine_stays_away(model_dirs, processes):
    cmd = stack_commands(str(model_dirs("llama")), "--metrics-port", "0")
    processes.extend([spawn(*cmd.worker), spawn(*cmd.engine)])
    engine = processes[-1]
    processes.append(spawn(*cmd.frontend, "--stall-timeout", "1", "--health-timeout", "2", "--resume-timeout", "2"))
    wait_healthy(cmd.base)
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream_events, cmd.base, "tiny", 1000, started)
        whole = pool.submit(complete, cmd.base, "tiny", 1000)
        assert started.wait(60)
        engine.kill()
        events = streamed.result(timeout=60)
        with pytest.raises(urllib.error.HTTPError) as err:
            whole.result(timeout=60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "The engine stopped responding while serving this request."
    assert err.value.code == 503
    assert processes[-1].poll() is None  # the frontend carries on


@pytest.mark.parametrize("scheduling", ["--async-scheduling", "--no-async-scheduling"])
def test_requests_survive_a_hung_and_a_dead_worker(model_dirs, processes, scheduling):
    metrics_port = free_port()
    cmd = stack_commands(
        str(model_dirs("llama")), "--metrics-port", str(metrics_port), "--worker-timeout", "2", scheduling
    )
    base = cmd.base
    worker = spawn(*cmd.worker)
    processes.extend([worker, spawn(*cmd.engine), spawn(*cmd.frontend)])
    wait_healthy(base)
    expected = complete(base, "tiny", 1000)["choices"][0]
    assert expected["finish_reason"] == "length"

    def interrupted(stop_worker, start_worker) -> tuple[str, str]:
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stream, base, "tiny", 1000, started)
            assert started.wait(60)  # tokens are flowing
            stop_worker()
            wait_status(base, 503)  # the engine counted the worker as lost
            assert not pending.done()
            start_worker()
            wait_healthy(base)
            return pending.result(timeout=120)

    # hung (SIGSTOP) past the timeout, then resumed: the same process re-joins
    got = interrupted(lambda: worker.send_signal(signal.SIGSTOP), lambda: worker.send_signal(signal.SIGCONT))
    assert got == (expected["text"], "length")

    # killed, and a new worker process takes its place
    got = interrupted(worker.kill, lambda: processes.append(spawn(*cmd.worker)))
    assert got == (expected["text"], "length")
    assert all(p.poll() is None for p in processes[1:])  # the engine and frontend never restarted
    engine = scrape(metrics_port)
    assert engine["pagedserve_engine_worker_restarts_total"] >= 2  # one per outage (more if a busy CPU starved a heartbeat)
    assert engine["pagedserve_engine_connected_workers"] == 1


def test_a_worker_with_other_settings_is_rejected_with_the_reason(model_dirs, processes):
    cmd = stack_commands(str(model_dirs("llama")), "--metrics-port", "0")
    processes.extend([spawn(*cmd.engine), spawn(*cmd.frontend)])
    wrong = spawn(*cmd.worker, "--block-size", "32", stderr=subprocess.PIPE, text=True)
    processes.append(wrong)
    assert wrong.wait(120) == 1
    assert "block_size 32 differs from the engine's 16" in wrong.stderr.read()
    processes.append(spawn(*cmd.worker))  # the engine still takes a worker that matches
    wait_healthy(cmd.base)
    assert complete(cmd.base, "tiny")["usage"]["completion_tokens"] == 5
