"""`pagedserve serve` supervises its replicas: a replica whose engine is killed comes back alone
while the other replica serves, and a stream in flight on it resumes with the text of an
undisturbed run; a tensor-parallel rank stopped mid-step makes its peer's collective time out
within --dist-timeout, and the replica's workers start anew; a killed frontend stops serve,
which names it and exits non-zero."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil
from service_helpers import scrape, sse_events
from test_serve import _post, children, start_serve, wait_line

from pagedserve.serve import free_port

PROMPT = [7, 8, 9, 10, 11, 12]
LONG = 900  # tokens: the stream is still running when its replica is hit


def _kid(proc, role: str, needle: str = "") -> psutil.Process:
    """serve's child of ``role`` whose command line contains ``needle``."""
    return next(k for k in children(proc) if f" {role} " in " ".join(k.cmdline()) + " " and needle in " ".join(k.cmdline()))


def _flag(kid: psutil.Process, flag: str) -> str:
    cmd = kid.cmdline()
    return cmd[cmd.index(flag) + 1]


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (OSError, StopIteration, KeyError):  # a process or port not there yet
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _greedy(port: int, max_tokens: int) -> dict:
    """A greedy completion of PROMPT (200, or the test fails)."""
    status, out = _post(port, {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert status == 200, out
    return out


def _stream_hit(port: int, max_tokens: int, hit: Callable[[], None]) -> str:
    """Stream a greedy completion, call ``hit`` once tokens flow, return the stream's text."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(sse_events, f"http://127.0.0.1:{port}/v1/completions", body, started)
        assert started.wait(120)
        hit()
        assert not pending.done(), "the stream ended before its replica was hit"
        events = pending.result(timeout=240)
    assert events[-1] == "[DONE]", events[-3:]
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert choices[-1]["finish_reason"] == "length", events[-3:]
    return "".join(c["text"] for c in choices)


def test_a_dead_replica_restarts_alone_and_a_dead_frontend_stops_serve(model_dirs):
    """Two data-parallel replicas, each with its own metrics port and devices."""
    port = free_port()
    proc = start_serve(str(model_dirs("llama")), port, "--data-parallel-size", "2", "--max-model-len", "1024",
                       env={"CUDA_VISIBLE_DEVICES": "3,5"})
    try:
        assert "2 engine replica(s)" in wait_line(proc, "serving")
        stderr = _drain(proc.stderr)
        workers = [_kid(proc, "worker", f"workers-{r}") for r in range(2)]
        assert [w.environ()["CUDA_VISIBLE_DEVICES"] for w in workers] == ["3", "5"]
        frontend = _kid(proc, "frontend").cmdline()
        given = frontend[frontend.index("--engine-input") + 1 : frontend.index("--engine-output")]
        assert [a.rsplit("/", 1)[1] for a in given] == ["input-0", "input-1"]
        engines = [_kid(proc, "engine", f"input-{r}") for r in range(2)]
        ports = [int(_flag(e, "--metrics-port")) for e in engines]
        expected = _greedy(port, LONG)["choices"][0]["text"]
        home: list[int] = []

        def kill_its_engine() -> None:
            for w in workers:  # no token can come while its home is found, so the stream cannot end first
                w.send_signal(signal.SIGSTOP)
            try:
                _wait_for(lambda: home.append(next(r for r in range(2) if scrape(ports[r])
                                                   ["pagedserve_engine_requests_running"] == 1)) is None, 30, "no home")
                engines[home[0]].kill()
            finally:
                for w in workers:
                    w.send_signal(signal.SIGCONT)
            for _ in range(3):  # the other replica serves meanwhile (a request sent to the dead one waits)
                assert _greedy(port, 4)["usage"]["completion_tokens"] == 4

        assert _stream_hit(port, LONG, kill_its_engine) == expected  # resumed on the restarted engine
        h = home[0]
        again = _kid(proc, "engine", f"input-{h}")
        assert again.pid != engines[h].pid and _kid(proc, "engine", f"input-{1 - h}").pid == engines[1 - h].pid
        assert _kid(proc, "worker", f"workers-{h}").pid == workers[h].pid  # its worker joined the new engine
        _wait_for(lambda: scrape(ports[h])["pagedserve_engine_connected_workers"] == 1, 60, "no worker")
        assert f"pagedserve: engine-{h} exited with code -9; restarting engine-{h}\n" in stderr
        _kid(proc, "frontend").kill()
        assert proc.wait(30) == 1
        time.sleep(0.5)  # the reader's last lines
        assert any(line.startswith("pagedserve: frontend-") and "stopping the stack" in line for line in stderr), stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def _drain(stream) -> list[str]:
    """Lines of ``stream`` as they come (a thread reads it, so serve never blocks on a full pipe)."""
    lines: list[str] = []
    threading.Thread(target=lines.extend, args=(stream,), daemon=True).start()  # appends line by line
    return lines


def test_a_rank_stopped_mid_step_times_out_and_the_group_restarts(model_dirs):
    """TP=2: rank 1 stopped (SIGSTOP) while a stream runs; rank 0's collective gives up within
    --dist-timeout instead of gloo's 30 minutes, the worker exits, serve starts both ranks anew,
    and the stream resumes with the undisturbed text."""
    port = free_port()
    proc = start_serve(str(model_dirs("llama")), port, "--tensor-parallel-size", "2", "--dist-timeout", "10",
                       "--frontends", "1")
    try:
        wait_line(proc, "serving", timeout_s=180)
        stderr = _drain(proc.stderr)
        ranks = [_kid(proc, "worker", f"--rank {r}") for r in range(2)]
        expected = _greedy(port, 200)["choices"][0]["text"]
        try:
            assert _stream_hit(port, 200, lambda: ranks[1].send_signal(signal.SIGSTOP)) == expected
        finally:
            if ranks[1].is_running():
                ranks[1].send_signal(signal.SIGCONT)
        assert not ranks[0].is_running() and not ranks[1].is_running()
        new = [_kid(proc, "worker", f"--rank {r}") for r in range(2)]
        assert {k.pid for k in new}.isdisjoint(k.pid for k in ranks)
        # rank 0 ended on its own (status 1): the serve supervisor had no reason to stop it
        assert "pagedserve: worker-0 exited with code 1; restarting worker-0, worker-1\n" in stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
