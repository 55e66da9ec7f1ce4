"""Async scheduling in the engine core: step N+1 is planned before step N's result is read.

The worker stand-in (test_scheduler.TokenCounter) checks the plans against what a worker knows,
and its tokens depend only on each request's own tokens, so every request must end with the same
tokens and finish reason as under the synchronous schedule, with every KV block back in the pool.
"""

from __future__ import annotations

import random

import pytest
from test_scheduler import EOS, TokenCounter

from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.protocol import StepPlan, StepResult
from shared.sampling_params import SamplingParams

MAX_MODEL_LEN = 64


def core(num_blocks: int, async_scheduling: bool, worker=None, budget: int = 64, max_seqs: int = 8) -> EngineCore:
    model = ModelConfig(
        path="", name="t", architecture="LlamaForCausalLM", hidden_size=8, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=8, vocab_size=64, max_model_len=MAX_MODEL_LEN, dtype=None,
        checkpoint_dtype="float32", eos_token_ids=(EOS,),
    )
    scheduler = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, async_scheduling=async_scheduling)
    config = EngineConfig(model, CacheConfig(block_size=4), scheduler)
    return EngineCore(config, worker or TokenCounter(), num_blocks)


def add(engine: EngineCore, rid: str, n_prompt: int, **params) -> None:
    prompt = [(i * 7 + len(rid)) % 50 + 1 for i in range(n_prompt)]
    engine.add_request(engine.make_request(rid, prompt, SamplingParams(**params)))


def drain(engine: EngineCore, outputs: dict | None = None, limit: int = 10_000) -> dict[str, tuple[str, list[int]]]:
    """Step until nothing is left; returns req_id -> (finish reason, every token it was given)."""
    outputs = {} if outputs is None else outputs
    for _ in range(limit):
        if not engine.has_unfinished():
            return outputs
        collect(engine, outputs)
    raise AssertionError("the engine did not drain")


def collect(engine: EngineCore, outputs: dict) -> None:
    for d in engine.step():
        reason, tokens = outputs.get(d.req_id, (None, []))
        assert reason is None, f"{d.req_id} got output after it finished"
        outputs[d.req_id] = (d.finish_reason, tokens + d.new_token_ids)


def assert_empty(engine: EngineCore) -> None:
    s = engine.scheduler
    assert not s.requests and not s.running and not s.waiting and not s.placeholders and not engine.in_flight
    assert s.kv.pool.num_free_blocks == len(s.kv.pool.blocks)
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)


class CountingWorker(TokenCounter):
    """TokenCounter that also counts the tokens each request sampled, discarded ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.sampled: dict[str, int] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        result = super().execute(plan)
        for rid in result.req_ids:
            self.sampled[rid] = self.sampled.get(rid, 0) + 1
        return result


def test_a_step_is_planned_while_the_previous_one_is_in_flight():
    engine = core(64, async_scheduling=True)
    add(engine, "a", 5, max_tokens=4, ignore_eos=True)
    assert engine.step() == []  # planned and submitted; its result is read with the next step
    assert len(engine.in_flight) == 1 and engine.scheduler.placeholders == {"a": 1}
    deltas = engine.step()  # plans a's decode from the placeholder, then reads the prefill's token
    assert [(d.req_id, len(d.new_token_ids)) for d in deltas] == [("a", 1)]
    assert len(engine.in_flight) == 1 and engine.scheduler.placeholders == {"a": 1}
    assert engine.in_flight[0].num_scheduled_tokens == {"a": 1}


@pytest.mark.parametrize("params", [
    {"max_tokens": 7, "ignore_eos": True},  # max_tokens
    {"max_tokens": 40, "stop_token_ids": [3, 9, 17]},  # a stop id (TokenCounter's tokens are 1..50)
    {"max_tokens": 40, "stop_token_ids": list(range(1, 51)), "min_tokens": 4},
])
def test_finishes_match_the_synchronous_schedule_and_max_tokens_costs_no_extra_step(params):
    runs = {}
    for mode in (False, True):
        worker = CountingWorker()
        engine = core(64, mode, worker)
        for i in range(3):
            add(engine, f"r{i}", 5 + 3 * i, **params)
        runs[mode] = (drain(engine), worker)
        assert_empty(engine)
    (sync_out, _), (async_out, async_worker) = runs[False], runs[True]
    assert async_out == sync_out
    for rid, (reason, tokens) in async_out.items():
        if reason == "length":  # known in advance: not one token sampled past max_tokens
            assert len(tokens) == params["max_tokens"] == async_worker.sampled[rid]
        else:  # a stop id is seen one step late: at most one token more was sampled, and discarded
            assert tokens[-1] in params["stop_token_ids"]
            assert async_worker.sampled[rid] - len(tokens) in (0, 1)


def test_preemption_under_a_tiny_pool_gives_the_same_tokens():
    runs = {}
    for mode in (False, True):
        engine = core(16, mode, budget=32)
        for i in range(5):
            add(engine, f"r{i}", 9 + i, max_tokens=20, ignore_eos=True)
        runs[mode] = drain(engine)
        assert engine.scheduler.num_preemptions > 0
        assert_empty(engine)
    assert runs[True] == runs[False]
    assert all(reason == "length" and len(tokens) == 20 for reason, tokens in runs[True].values())


@pytest.mark.parametrize("caching", [True, False])
def test_random_arrivals_and_aborts_leave_no_leaks(caching):
    rng = random.Random(99)
    engine = core(24, True, budget=24, max_seqs=5)
    engine.scheduler.kv.enable_caching = caching
    outputs: dict = {}
    aborted, specs = set(), {}
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            rid = f"q{len(specs)}"
            specs[rid] = (rng.randint(1, 30), rng.randint(1, 20))
            add(engine, rid, specs[rid][0], max_tokens=specs[rid][1])
        if engine.scheduler.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(engine.scheduler.requests))
            assert engine.abort([rid])[0].finish_reason == "abort"
            outputs[rid] = ("abort", outputs.get(rid, (None, []))[1])
            aborted.add(rid)
        collect(engine, outputs)
        pool = engine.scheduler.kv.pool
        assert sum(1 for b in pool.blocks if b.ref_cnt > 0) + pool.num_free_blocks == 24
    drain(engine, outputs)
    assert_empty(engine)
    # every request that was not aborted got exactly what it gets alone, synchronously
    alone = core(24, False)
    for rid, (n_prompt, max_tokens) in specs.items():
        add(alone, rid, n_prompt, max_tokens=max_tokens)
    expected = drain(alone)
    assert {r: out for r, out in outputs.items() if r not in aborted} == {
        r: out for r, out in expected.items() if r not in aborted
    }


def test_an_abort_mid_stream_frees_every_block_and_a_reused_id_starts_clean():
    engine = core(32, True)
    add(engine, "a", 6, max_tokens=30, ignore_eos=True)
    add(engine, "b", 9, max_tokens=30, ignore_eos=True)
    outputs: dict = {}
    for _ in range(5):
        collect(engine, outputs)
    assert engine.in_flight  # a step computing "a" is in flight
    engine.abort(["a", "b"])
    # the same id again, a different prompt, while the step that computed the old one is in flight
    add(engine, "a", 3, max_tokens=6, ignore_eos=True)
    fresh: dict = {}
    drain(engine, fresh)
    assert_empty(engine)
    alone = core(32, False)
    add(alone, "a", 3, max_tokens=6, ignore_eos=True)
    assert fresh == drain(alone)


def test_restarted_workers_with_steps_in_flight_recompute_every_request():
    def run(crash_at: int | None) -> dict:
        engine = core(40, True, budget=16)
        for i in range(4):
            add(engine, f"r{i}", 9 + i, max_tokens=10, ignore_eos=True)
        outputs: dict = {}
        for step in range(8):
            if step == crash_at:  # the steps in flight never answer
                engine.restart_workers(30)
                engine.pipeline.executor = TokenCounter()  # a new worker knows nothing
            collect(engine, outputs)
        drain(engine, outputs)
        assert_empty(engine)
        return outputs

    assert run(crash_at=4) == run(crash_at=None)


def test_the_step_timeline_counts_transport_only_while_the_receiver_waits():
    from services.engine.timeline import step_timeline
    from services.engine.workers import StepTimes

    # synchronous: plan sent at 100.000, taken at 100.002 after 5 ms idle, computed 30 ms, result
    # read at 100.034 by an engine waiting since it sent the plan
    t = step_timeline(StepTimes(100.0, 100.0, 100.034), StepResult(1, [], [], received_at=100.002, idle_s=0.005,
                                                                   compute_s=0.030))
    assert (t.compute_s, t.idle_s) == (0.030, 0.005)
    assert t.transport_s == pytest.approx(0.002 + 0.002)
    # async: the plan waited behind the previous step (the worker never idled) and the result was
    # queued while the engine planned the next step: nothing of either was on the critical path
    t = step_timeline(StepTimes(100.0, 100.050, 100.050), StepResult(2, [], [], received_at=100.010, idle_s=0.0,
                                                                     compute_s=0.030))
    assert t.transport_s == 0.0
