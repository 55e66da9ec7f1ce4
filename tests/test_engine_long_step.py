"""A long worker step (a big prefill of a large model on a CPU can take minutes) does not make the
engine look dead: a real engine process answers its frontends' Pings while it waits for the step,
counts what they sent meanwhile, and applies those messages once the step ends. The worker here
is the test itself, a rank-0 DEALER that speaks the protocol and holds one step back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import zmq
from service_helpers import stop_processes
from test_engine_service import Client

from pagedserve.serve import free_port
from shared.protocol import (
    AddRequest,
    EngineToWorker,
    Outputs,
    Ping,
    Pong,
    StepPlan,
    StepResult,
    WorkerAccepted,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue

HOLD_S = 6.0  # the held step: longer than a frontend's health timeout (5 s by default)


def next_plan(worker: DealerQueue, timeout_s: float = 60) -> StepPlan:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = worker.recv(timeout_ms=500)
        if isinstance(msg, StepPlan):
            return msg
    raise TimeoutError("the engine sent no step")


def answer(worker: DealerQueue, plan: StepPlan, token: int) -> None:
    """Rank 0's result: one token for every request that computed its last scheduled token."""
    done = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
    worker.send(StepResult(plan.step_id, done, [token] * len(done)))


def pong(client: Client, ping_id: int, within_s: float) -> Pong:
    client.tx.send(Ping(ping_id))
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        msg = client.rx.recv(timeout_ms=100)
        if isinstance(msg, Pong) and msg.ping_id == ping_id:
            return msg
    raise AssertionError(f"no Pong within {within_s}s")


def test_pings_are_answered_during_a_long_step_and_requests_sent_meanwhile_run_after_it(model_dirs, tmp_path):
    inp, out, wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    model = str(model_dirs("llama"))
    cmd = [sys.executable, "-m", "pagedserve.cli", "engine", "--model", model, "--max-model-len", "128",
           "--frontend-input", inp, "--frontend-output", out, "--worker-addr", wrk,
           "--metrics-port", str(free_port()), "--frontend-timeout", "3"]
    with open(tmp_path / "engine.log", "w") as log:
        engine = subprocess.Popen(cmd, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"), stdout=log, stderr=log)
    ctx = zmq.Context()
    worker = DealerQueue(ctx, wrk, EngineToWorker, WorkerToEngine, identity=b"rank-0")
    try:
        worker.send(WorkerReady(0, 1, 64, 16, 128, "test-worker"))
        assert isinstance(worker.recv(timeout_ms=60_000), WorkerAccepted)
        with Client(inp, out) as client:
            client.hello()
            params = SamplingParams(max_tokens=2, ignore_eos=True)
            client.tx.send(AddRequest("first", np.array([5, 6, 7], np.int32), params))
            held = next_plan(worker)
            assert [r.req_id for r in held.new_requests] == ["first"]
            # the step is held: the engine answers at once, and counts what it was sent meanwhile
            start = time.monotonic()
            assert pong(client, 1, within_s=2).num_running == 1
            client.tx.send(AddRequest("second", np.array([8, 9], np.int32), params))
            while time.monotonic() - start < HOLD_S:
                busy = pong(client, 2, within_s=2)
                assert (busy.num_running, busy.num_waiting) == (1, 1)
                client.beat()
                worker.send(WorkerHeartbeat(0, "test-worker"))
                time.sleep(1.0)
            answer(worker, held, 11)
            # then "second" (taken during the step) is scheduled, and both run to their end
            tokens: dict[str, list[int]] = {"first": [], "second": []}
            finished: set[str] = set()
            deadline = time.monotonic() + 60
            while len(finished) < 2 and time.monotonic() < deadline:
                plan = next_plan(worker)
                answer(worker, plan, 12)
                while isinstance(msg := client.rx.recv(timeout_ms=200), (Outputs, Pong)):
                    for d in getattr(msg, "deltas", []):
                        tokens[d.req_id] += d.new_token_ids
                        if d.finish_reason:
                            finished.add(d.req_id)
            assert tokens == {"first": [11, 12], "second": [12, 12]}
        assert engine.poll() is None
    finally:
        worker.close()
        ctx.term()
        stop_processes([engine])
