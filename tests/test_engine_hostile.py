"""Hostile peers against a real engine and worker: malformed and generated messages from a
frontend, another frontend's aborts and request ids, forged worker answers, an input address
that cannot be bound. The engine drops what is wrong, logs it, and serves everyone else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from service_helpers import scrape
from test_engine_service import Client, engine_stack
from test_protocol_decode import forged, message_frames

from pagedserve.serve import free_port
from shared.protocol import (
    AbortRequests,
    AddRequest,
    EngineToWorker,
    FrontendMessage,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    StepResult,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue


@pytest.fixture(scope="module")
def engine_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine") / "engine.log"


@pytest.fixture(scope="module")
def stack(model_dirs, engine_log):
    with engine_stack(str(model_dirs("llama")), "--frontend-timeout", "3", engine_log=engine_log) as started:
        yield started


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


def pong_after(client: Client, ping_id: int) -> list:
    """Ping, and return everything the engine sent before its Pong (but ModelInfo answers to the
    repeated Hellos of a client that joined while the engine was starting)."""
    client.tx.send(Ping(ping_id))
    replies = []
    while not (isinstance(msg := client.rx.recv(timeout_ms=30_000), Pong) and msg.ping_id == ping_id):
        assert msg is not None, "the engine stopped answering"
        replies += [] if isinstance(msg, (ModelInfo, Pong)) else [msg]
    return replies


def test_malformed_messages_are_dropped_and_the_engine_serves_on(stack, engine_log):
    _, inp, out, procs, _ports = stack
    with Client(inp, out) as client:
        client.hello()
        pong_after(client, 6)
        logged = engine_log.read_text().count("dropped a malformed message")
        for frames in MALFORMED:
            client.tx.sock.send_multipart(frames)
        assert pong_after(client, 7) == []  # each malformed message was dropped, unanswered,
        assert engine_log.read_text().count("dropped a malformed message") - logged == len(MALFORMED)  # and logged
        client.tx.send(AddRequest("good", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True)))
        reason, tokens = client.collect({"good"})["good"]
        assert reason == "length" and len(tokens) == 5
    assert all(p.poll() is None for p in procs)


def test_a_frontend_cannot_abort_or_take_over_another_frontends_request(stack):
    _, inp, out, _procs, _ports = stack
    with Client(inp, out) as owner, Client(inp, out) as other:
        owner.hello()
        other.hello()
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        owner.tx.send(AddRequest("mine", PROMPT, params))
        early = pong_after(owner, 1)  # the engine holds "mine" now (two sockets keep no order)
        other.tx.send(AbortRequests(["mine"]))
        other.tx.send(AddRequest("mine", np.array([5], np.int32), SamplingParams(max_tokens=2)))
        refused = other.collect({"mine"}, timeout_s=30)["mine"]
        assert refused[0] == "error: request id 'mine' is already in use"
        reason, tokens = owner.collect({"mine"})["mine"]
        early_tokens = [t for m in early if isinstance(m, Outputs) for d in m.deltas for t in d.new_token_ids]
        assert reason == "length" and len(early_tokens + tokens) == 30


def test_forged_worker_messages_neither_fail_steps_nor_take_a_rank(stack):
    _, inp, out, procs, ports = stack
    wrk = procs[0].args[procs[0].args.index("--worker-addr") + 1]  # the engine's worker address
    ctx = zmq.Context()
    forger = DealerQueue(ctx, wrk, EngineToWorker, WorkerToEngine, identity=b"forger")
    try:
        with Client(inp, out) as client:
            info = client.hello()
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            client.tx.send(AddRequest("ref", PROMPT, params))
            reference = client.collect({"ref"})["ref"]
            restarts = scrape(ports[0])["pagedserve_engine_worker_restarts_total"]
            client.tx.send(AddRequest("target", PROMPT, params))
            forger.send(WorkerReady(0, 1, info.num_blocks, info.block_size, info.max_model_len, "forged"))
            for step in range(200):  # whatever step is in flight, from an identity that is not rank 0's
                forger.send(WorkerFailed(0, step, "forged failure"))
                forger.send(StepResult(step, ["target"], [5]))
            forger.send(WorkerHeartbeat(0, "forged"))
            assert client.collect({"target"})["target"] == reference
    finally:
        forger.close()
        ctx.term()
    metrics = scrape(ports[0])
    assert metrics["pagedserve_engine_worker_restarts_total"] == restarts
    assert metrics["pagedserve_engine_connected_workers"] == 1
    assert all(p.poll() is None for p in procs)


def test_generated_frontend_messages_never_stop_the_engine(stack):
    """Property-based: whatever a frontend sends (messages built from the protocol's types with
    wrong shapes, dtypes and ranges, or valid ones), the engine answers the next Ping."""
    _, inp, out, procs, ports = stack
    ping_ids = iter(range(10, 10**6))
    with Client(inp, out) as client:  # its Goodbye at the end aborts whatever it started
        client.hello()

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(frames=message_frames(FrontendMessage))
        def send(frames: list[bytes]) -> None:
            client.tx.sock.send_multipart(frames)
            pong_after(client, next(ping_ids))

        send()
    with Client(inp, out) as fresh:
        fresh.hello()
        fresh.tx.send(AddRequest("after", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True)))
        assert fresh.collect({"after"})["after"][0] == "length"
        fresh.tx.send(Ping(1))
        assert fresh.rx.recv(timeout_ms=10_000).num_running == 0
    assert scrape(ports[0])["pagedserve_engine_kv_cache_usage_ratio"] == 0.0  # nothing leaked
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
