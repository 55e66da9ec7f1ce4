"""The engine's worker group over real sockets, with the peer a rank-0 DEALER that speaks the
protocol as a worker does: only the step in flight, from the registered identity of its rank,
counts."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from pagedserve.serve import free_port
from services.engine.workers import WorkerError, WorkerGroup
from shared.config import CacheConfig, EngineConfig, ModelConfig
from shared.protocol import (
    EngineToWorker,
    NewRequestData,
    StepPlan,
    StepResult,
    WorkerAccepted,
    WorkerFailed,
    WorkerReady,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue


@pytest.fixture
def group(model_dirs):
    config = EngineConfig(ModelConfig.from_pretrained(str(model_dirs("llama")), max_model_len=128), CacheConfig())
    ctx, addr = zmq.Context(), f"tcp://127.0.0.1:{free_port()}"
    workers = WorkerGroup(ctx, addr, config, "engine-1")

    def peer(identity: bytes) -> DealerQueue:
        return DealerQueue(ctx, addr, EngineToWorker, WorkerToEngine, identity=identity)

    rank0 = peer(b"worker-0")
    ready = WorkerReady(0, 1, 64, 16, 128, "instance-0")
    rank0.send(ready)
    assert workers.handshake(30) == 64
    assert isinstance(rank0.recv(timeout_ms=5000), WorkerAccepted)
    yield workers, rank0, peer, ready
    workers.queue.close()
    ctx.destroy(linger=0)


def plan(step_id: int) -> StepPlan:
    new = NewRequestData("r", np.array([5, 6], np.int32), np.array([], np.int32), SamplingParams(), [], [0], 0)
    return StepPlan(step_id, [new], [], {"r": 2}, [])


def execute_in_thread(workers: WorkerGroup, step: StepPlan) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = workers.execute(step)
        except WorkerError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_stale_and_forged_answers_are_ignored_and_the_real_one_counts(group):
    workers, rank0, peer, ready = group
    thread, out = execute_in_thread(workers, plan(101))
    assert rank0.recv(timeout_ms=5000).step_id == 101
    forger = peer(b"forger")
    forger.send(WorkerReady(0, 1, 64, 16, 128, "forged"))  # rank 0 is connected and alive
    forger.send(WorkerFailed(0, 101, "forged failure"))
    forger.send(StepResult(101, ["r"], [666]))
    rank0.send(WorkerFailed(0, 100, "a late failure of an earlier step"))
    rank0.send(StepResult(100, ["r"], [777]))
    rank0.send(StepResult(101, ["r"], [42]))
    thread.join(30)
    assert out["result"].sampled_token_ids == [42]
    assert workers.ranks == {0: b"worker-0"} and workers.epoch == 0 and not workers.stale
    assert workers.reports[0] == ready


def test_a_failure_of_the_step_in_flight_from_its_rank_fails_the_step(group):
    workers, rank0, _peer, _ready = group
    thread, out = execute_in_thread(workers, plan(7))
    assert rank0.recv(timeout_ms=5000).step_id == 7
    rank0.send(WorkerFailed(0, 7, "out of memory"))
    thread.join(30)
    assert "out of memory" in str(out["error"])


def test_two_steps_in_flight_are_answered_in_order_whatever_comes_first(group):
    """Async scheduling sends plan N+1 before reading result N: answers are kept by step id (also
    when polled between steps), and a failure of N+1 that arrives first fails N+1 alone."""
    workers, rank0, _peer, _ready = group
    first, second = plan(20), plan(21)
    workers.submit(first)
    workers.submit(second)
    assert [rank0.recv(timeout_ms=5000).step_id for _ in range(2)] == [20, 21]
    rank0.send(WorkerFailed(0, 21, "the second step failed"))
    rank0.send(StepResult(20, ["r"], [5]))
    deadline = time.monotonic() + 10
    while len(workers.answers) < 2 and time.monotonic() < deadline:
        workers.poll()  # between steps: answers of steps in flight are kept, not dropped
    assert workers.collect(first).sampled_token_ids == [5]
    with pytest.raises(WorkerError, match="the second step failed"):
        workers.collect(second)
    assert not workers.in_flight and not workers.answers
