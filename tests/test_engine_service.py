"""The engine and a worker as real processes over real sockets, driven by a raw DEALER client."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from service_helpers import scrape, stop_processes
from test_protocol_decode import forged, message_frames

from pagedserve.serve import free_port
from shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    AbortRequests,
    AddRequest,
    EngineMessage,
    EngineToWorker,
    FrontendHeartbeat,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    RequestFailed,
    StepResult,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue


@contextlib.contextmanager
def engine_stack(model: str, *engine_flags: str, max_model_len: int = 128, engine_log: Path | None = None):
    """An engine (with engine_flags) and one worker as processes: yields (model, input address,
    output address, processes, (engine metrics port, worker metrics port)). engine_log: a file
    for the engine's output (default: the test's own)."""
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
                cli + ["worker", *common, "--worker-addr", wrk, "--metrics-port", str(worker_metrics)], env=env
            ),
        ]
        try:
            yield model, inp, out, procs, (engine_metrics, worker_metrics)
        finally:
            stop_processes(procs)


@pytest.fixture(scope="module")
def engine_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine") / "engine.log"


@pytest.fixture(scope="module")
def stack(model_dirs, engine_log):
    with engine_stack(str(model_dirs("llama")), "--frontend-timeout", "3", engine_log=engine_log) as started:
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


PROMPT = np.array([41, 42, 43], dtype=np.int32)
MALFORMED = [
    forged("AddRequest", "m-2d", np.zeros((2, 2), np.int32), {}),
    forged("AddRequest", "m-0d", np.array(7, np.int32), {}),
    forged("AddRequest", "m-float", np.array([1.0, 2.0]), {}),
    forged("AddRequest", "m-int64", np.array([1, 2], np.int64), {}),
    forged("AddRequest", "m-neg", np.array([-5, 3], np.int32), {}),
    forged("AddRequest", "m-list", [1, 2, 3], {}),
    forged("AddRequest", "", PROMPT, {}),
    forged("AddRequest", "m" * 5000, PROMPT, {}),
    forged("AddRequest", "m-prio", PROMPT, {}, 2**64 - 1),
    forged("AddRequest", "m-out", PROMPT, {}, 0, np.zeros((1, 3), np.int32)),
    forged("AddRequest", "m-max", PROMPT, {"max_tokens": -1}),
    forged("AddRequest", "m-nan", PROMPT, {"temperature": float("nan")}),
    forged("AddRequest", "m-bias", PROMPT, {"logit_bias": {"5": float("inf")}}),
    forged("AddRequest", "m-top-p", PROMPT, {"top_p": 0.0}),
    forged("AbortRequests", [-1]),
    forged("AbortRequests", "m-abort"),
    forged("Ping", -3),
    forged("Hello", 5),
    [msgspec.msgpack.encode(["AddRequest", "m-ext", msgspec.msgpack.Ext(1, b"\x93\xa3<i4\x91\x03\x05"), {}])],
    [b"\xc1"],
    [b""],
]


def test_malformed_messages_are_dropped_and_the_engine_serves_on(stack, engine_log):
    _, inp, out, procs, _ports = stack
    client = Client(inp, out)
    client.hello()
    logged = engine_log.read_text().count("dropped a malformed message")
    for frames in MALFORMED:
        client.tx.sock.send_multipart(frames)
    client.tx.send(Ping(7))
    replies = []
    while not isinstance(msg := client.rx.recv(timeout_ms=30_000), Pong):
        assert msg is not None, "the engine stopped answering"
        replies.append(msg)
    assert msg.ping_id == 7 and replies == []  # each malformed message was dropped, unanswered
    assert engine_log.read_text().count("dropped a malformed message") - logged == len(MALFORMED)  # and logged
    client.tx.send(AddRequest("good", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True)))
    reason, tokens = client.collect({"good"})["good"]
    assert reason == "length" and len(tokens) == 5
    assert all(p.poll() is None for p in procs)
    client.close()


def test_a_frontend_cannot_abort_or_take_over_another_frontends_request(stack):
    _, inp, out, _procs, _ports = stack
    owner, other = Client(inp, out), Client(inp, out)
    owner.hello()
    other.hello()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    owner.tx.send(AddRequest("mine", PROMPT, params))
    other.tx.send(AbortRequests(["mine"]))
    other.tx.send(AddRequest("mine", np.array([5], np.int32), SamplingParams(max_tokens=2)))
    refused = other.collect({"mine"}, timeout_s=30)["mine"]
    assert refused[0] == "error: request id 'mine' is already in use"
    reason, tokens = owner.collect({"mine"})["mine"]
    assert reason == "length" and len(tokens) == 30
    owner.close()
    other.close()


def test_forged_worker_messages_neither_fail_steps_nor_take_a_rank(stack):
    _, inp, out, procs, ports = stack
    wrk = procs[0].args[procs[0].args.index("--worker-addr") + 1]  # the engine's worker address
    client = Client(inp, out)
    info = client.hello()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    client.tx.send(AddRequest("ref", PROMPT, params))
    reference = client.collect({"ref"})["ref"]
    restarts = scrape(ports[0])["pagedserve_engine_worker_restarts_total"]
    ctx = zmq.Context()
    forger = DealerQueue(ctx, wrk, EngineToWorker, WorkerToEngine, identity=b"forger")
    client.tx.send(AddRequest("target", PROMPT, params))
    forger.send(WorkerReady(0, 1, info.num_blocks, info.block_size, info.max_model_len, "forged"))
    for step in range(200):  # whatever step is in flight, from an identity that is not rank 0's
        forger.send(WorkerFailed(0, step, "forged failure"))
        forger.send(StepResult(step, ["target"], [5]))
    forger.send(WorkerHeartbeat(0, "forged"))
    assert client.collect({"target"})["target"] == reference
    metrics = scrape(ports[0])
    assert metrics["pagedserve_engine_worker_restarts_total"] == restarts
    assert metrics["pagedserve_engine_connected_workers"] == 1
    assert all(p.poll() is None for p in procs)
    forger.close()
    ctx.term()
    client.close()


def test_generated_frontend_messages_never_stop_the_engine(stack):
    """Property-based: whatever a frontend sends (messages built from the protocol's types with
    wrong shapes, dtypes and ranges, or valid ones), the engine answers the next Ping."""
    _, inp, out, procs, ports = stack
    client = Client(inp, out)
    client.hello()
    ping_ids = iter(range(10**6))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=message_frames(FrontendMessage))
    def send(frames: list[bytes]) -> None:
        client.tx.sock.send_multipart(frames)
        client.tx.send(Ping(ping_id := next(ping_ids)))
        deadline = time.monotonic() + 60
        while not (isinstance(msg := client.rx.recv(timeout_ms=1000), Pong) and msg.ping_id == ping_id):
            assert time.monotonic() < deadline, "the engine stopped answering"

    send()
    client.close()  # its Goodbye aborts whatever it started
    fresh = Client(inp, out)
    fresh.hello()
    fresh.tx.send(AddRequest("after", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True)))
    assert fresh.collect({"after"})["after"][0] == "length"
    fresh.tx.send(Ping(1))
    assert fresh.rx.recv(timeout_ms=10_000).num_running == 0
    assert scrape(ports[0])["pagedserve_engine_kv_cache_usage_ratio"] == 0.0  # nothing leaked
    fresh.close()
    assert all(p.poll() is None for p in procs)


def test_an_engine_that_cannot_bind_its_input_exits_instead_of_running_deaf(model_dirs):
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    addrs = [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    cmd = [sys.executable, "-m", "pagedserve.cli", "engine", "--model", str(model_dirs("llama")), "--metrics-port", "0",
           "--frontend-input", addrs[0], "--frontend-output", addrs[1], "--worker-addr", addrs[2]]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
        ctx.term()
    assert done.returncode != 0 and "Address already in use" in done.stderr
