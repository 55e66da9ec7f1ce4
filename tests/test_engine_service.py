"""The engine and a worker as real processes over real sockets, driven by a raw DEALER client."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from service_helpers import scrape, stop_processes
from typing_extensions import Self

from pagedserve.serve import free_port
from shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    AbortRequests,
    AddRequest,
    EngineMessage,
    FrontendHeartbeat,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    RequestFailed,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue


@contextlib.contextmanager
def engine_stack(model: str, *engine_flags: str, max_model_len: int = 128, engine_log: Path | None = None,
                 worker_flags: tuple[str, ...] = ()):
    """An engine (with engine_flags) and one worker (with worker_flags) as processes: yields (model,
    input address, output address, processes, (engine metrics port, worker metrics port)).
    engine_log: a file for the engine's output (default: the test's own)."""
    inp, out, wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    engine_metrics, worker_metrics = free_port(), free_port()
    common = ["--model", model, "--max-model-len", str(max_model_len), "--kv-cache-memory", str(8 << 20)]
    cli = [sys.executable, "-m", "pagedserve.cli"]
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING")
    engine = ["engine", *common, "--frontend-input", inp, "--frontend-output", out, "--worker-addr", wrk]
    with open(engine_log, "w") if engine_log else contextlib.nullcontext() as log:
        procs = [
            subprocess.Popen(
                cli + engine + ["--metrics-port", str(engine_metrics), *engine_flags], env=env, stdout=log, stderr=log
            ),
            subprocess.Popen(
                cli + ["worker", *common, "--worker-addr", wrk, "--metrics-port", str(worker_metrics), *worker_flags],
                env=env,
            ),
        ]
        try:
            yield model, inp, out, procs, (engine_metrics, worker_metrics)
        finally:
            stop_processes(procs)


@pytest.fixture(scope="module")
def stack(model_dirs):
    with engine_stack(str(model_dirs("llama")), "--frontend-timeout", "3") as started:
        yield started


class Client:
    """A frontend as the engine sees it: two DEALERs with one identity, a heartbeat while it waits."""

    def __init__(self, inp: str, out: str):
        self.ctx = zmq.Context()
        self.id = uuid.uuid4().hex
        self.tx = DealerQueue(self.ctx, inp, EngineMessage, FrontendMessage, identity=self.id.encode())
        self.rx = DealerQueue(self.ctx, out, EngineMessage, FrontendMessage, identity=self.id.encode())
        self.last_beat = 0.0

    def beat(self) -> None:
        if time.monotonic() - self.last_beat >= HEARTBEAT_INTERVAL_S:
            self.tx.send(FrontendHeartbeat(self.id))
            self.last_beat = time.monotonic()

    def hello(self, timeout_s: float = 120) -> ModelInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tx.send(Hello(self.id))
            msg = self.rx.recv(timeout_ms=1000)
            if isinstance(msg, ModelInfo):
                return msg
        raise TimeoutError("engine never answered Hello")

    def collect(self, req_ids: set[str], timeout_s: float = 60) -> dict[str, list]:
        tokens: dict[str, list] = {r: [] for r in req_ids}
        done: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(req_ids) and time.monotonic() < deadline:
            self.beat()
            msg = self.rx.recv(timeout_ms=1000)
            if isinstance(msg, Outputs):
                for d in msg.deltas:
                    if d.req_id not in tokens:
                        continue  # another request's (e.g. one a killed engine served)
                    tokens[d.req_id] += d.new_token_ids
                    if d.finish_reason:
                        done[d.req_id] = d.finish_reason
            elif isinstance(msg, RequestFailed):
                done[msg.req_id] = "error: " + msg.message
        return {r: (done.get(r), tokens[r]) for r in req_ids}

    def close(self) -> None:
        self.tx.send(Goodbye(self.id))
        self.tx.close()
        self.rx.close()
        self.ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also when the test failed: a context left to the garbage collector can hang it


def test_engine_serves_requests_like_offline(stack):
    from pagedserve import LLM

    model, inp, out, _procs, ports = stack
    prompts = [[11, 12, 13], list(range(20, 60)), [99] * 17]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, max_model_len=128, kv_cache_memory=8 << 20)
    expected = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    client = Client(inp, out)
    info = client.hello()
    assert info.max_model_len == 128 and info.num_blocks > 0
    for i, p in enumerate(prompts):
        client.tx.send(AddRequest(f"{client.id}-{i}", np.array(p, dtype=np.int32), params))
    got = client.collect({f"{client.id}-{i}" for i in range(3)})
    for i, exp in enumerate(expected):
        assert got[f"{client.id}-{i}"] == ("length", exp.outputs[0].token_ids)
    client.tx.send(Ping(1))
    pong = client.rx.recv(timeout_ms=10_000)
    assert (pong.ping_id, pong.num_running, pong.num_waiting, pong.engine_id) == (1, 0, 0, info.engine_id)
    engine = scrape(ports[0])
    assert engine["pagedserve_engine_connected_workers"] == 1
    assert engine["pagedserve_engine_connected_frontends"] >= 1
    assert engine["pagedserve_engine_prefix_cache_queried_tokens_total"] >= sum(map(len, prompts))
    worker = scrape(ports[1])
    assert worker["pagedserve_worker_kv_blocks"] == info.num_blocks
    assert worker["pagedserve_worker_tokens_per_step_count"] >= 8
    # busy time covers every step's forward and sampling (and the bookkeeping around them)
    computed = worker["pagedserve_worker_forward_seconds_sum"] + worker["pagedserve_worker_sampling_seconds_sum"]
    assert worker["pagedserve_worker_busy_seconds_total"] >= computed > 0
    client.close()


def test_bad_requests_fail_alone_and_aborts_free_the_engine(stack):
    _, inp, out, procs, ports = stack
    client = Client(inp, out)
    client.hello()
    long = np.arange(200, dtype=np.int32) % 50 + 10
    client.tx.send(AddRequest("bad-long", long, SamplingParams()))
    client.tx.send(AddRequest("bad-vocab", np.array([10**8], dtype=np.int32), SamplingParams()))
    client.tx.send(AddRequest("slow", np.array([5, 6, 7], dtype=np.int32), SamplingParams(max_tokens=100, ignore_eos=True)))
    client.tx.send(AbortRequests(["slow"]))
    got = client.collect({"bad-long", "bad-vocab", "slow"})
    assert got["bad-long"][0].startswith("error") and "max_model_len" in got["bad-long"][0]
    assert got["bad-vocab"][0].startswith("error") and "out of range" in got["bad-vocab"][0]
    assert got["slow"][0] == "abort" and len(got["slow"][1]) < 100
    client.tx.send(Ping(2))
    pong = client.rx.recv(timeout_ms=10_000)
    assert (pong.ping_id, pong.num_running, pong.num_waiting) == (2, 0, 0)  # nothing left running or waiting
    assert scrape(ports[0])["pagedserve_engine_kv_cache_usage_ratio"] == 0.0  # every block back in the pool
    assert all(p.poll() is None for p in procs)
    client.close()


def test_a_resumption_continues_an_undisturbed_greedy_run(stack):
    _, inp, out, _procs, _ports = stack
    client = Client(inp, out)
    client.hello()
    prompt = np.array([31, 32, 33, 34, 35], dtype=np.int32)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    client.tx.send(AddRequest("whole", prompt, params))
    reason, tokens = client.collect({"whole"})["whole"]
    assert reason == "length" and len(tokens) == 10
    resumed = AddRequest("resumed", prompt, params, output_token_ids=np.array(tokens[:4], np.int32))
    client.tx.send(resumed)
    assert client.collect({"resumed"})["resumed"] == ("length", tokens[4:])
    client.close()


def test_sigterm_stops_an_engine_still_waiting_for_its_workers(model_dirs):
    """An engine whose workers never come stops on SIGTERM at once, not after the handshake's
    timeout (minutes)."""
    port = free_port()
    addrs = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    engine = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.cli", "engine", "--model", str(model_dirs("llama")), "--max-model-len", "128",
         "--frontend-input", addrs[0], "--frontend-output", addrs[1], "--worker-addr", addrs[2],
         "--metrics-port", str(port)], env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
    try:
        deadline = time.monotonic() + 60
        while True:  # /metrics answers before the engine waits for workers
            with contextlib.suppress(OSError):
                scrape(port)
                break
            assert engine.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
        engine.terminate()
        assert engine.wait(10) == 0
    finally:
        stop_processes([engine])
