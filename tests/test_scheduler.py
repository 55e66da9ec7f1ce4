"""Scheduler invariants under random arrivals, aborts, chunked prefill and preemption."""

from __future__ import annotations

import random

import pytest

from services.engine.adapter_slots import MAX_PASSES
from services.engine.request import Request
from services.engine.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.lora import LoRARequest
from shared.protocol import StepPlan, StepResult
from shared.sampling_params import SamplingParams

EOS = 0


class TokenCounter:
    """Stands in for the worker's bookkeeping only: it tracks what the worker would know from the
    plans (tokens, computed counts) and emits a deterministic next token, so the scheduler's
    contract with the worker is checked step by step."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_req_ids:
            self.tokens.pop(rid)
            self.computed.pop(rid)
        for new in plan.new_requests:
            self.tokens[new.req_id] = new.prompt_token_ids.tolist() + new.output_token_ids.tolist()
            self.computed[new.req_id] = new.num_computed_tokens
            self.blocks[new.req_id] = list(new.block_ids)
        for c in plan.cached_requests:
            assert c.num_computed_tokens == self.computed[c.req_id]
            self.blocks[c.req_id] += c.new_block_ids
        ids, toks = [], []
        for rid, n in plan.num_scheduled_tokens.items():
            assert n >= 1
            self.computed[rid] += n
            assert self.computed[rid] <= len(self.tokens[rid])
            assert len(self.blocks[rid]) * 4 >= self.computed[rid]
            if self.computed[rid] == len(self.tokens[rid]):
                token = 1 + (sum(self.tokens[rid]) % 50)
                self.tokens[rid].append(token)
                ids.append(rid)
                toks.append(token)
        return StepResult(plan.step_id, ids, toks)


def make_scheduler(num_blocks: int, budget: int = 64, max_seqs: int = 8, caching: bool = True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        CacheConfig(block_size=4, enable_prefix_caching=caching),
        num_blocks,
    )


def request(rid: str, n_prompt: int, max_tokens: int, **kw) -> Request:
    prompt = [(i * 7 + len(rid)) % 50 + 1 for i in range(n_prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), (EOS,), max_model_len=256)


def run_to_completion(s: Scheduler, worker: TokenCounter, limit: int = 10_000) -> dict[str, tuple[str, int]]:
    """Drive until drained; returns req_id -> (finish reason, number of tokens it generated)."""
    finished, counts = {}, {}
    for _ in range(limit):
        if not s.has_unfinished():
            return finished
        plan = s.schedule()
        assert plan.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        for d in s.update(plan, worker.execute(plan)):
            counts[d.req_id] = counts.get(d.req_id, 0) + len(d.new_token_ids)
            if d.finish_reason:
                finished[d.req_id] = (d.finish_reason, counts[d.req_id])
    raise AssertionError("scheduler did not drain")


def test_chunked_prefill_does_not_starve_decodes():
    s, w = make_scheduler(num_blocks=64, budget=16), TokenCounter()
    s.add_request(request("short", 3, max_tokens=20))
    plan = s.schedule()
    s.update(plan, w.execute(plan))
    s.add_request(request("long", 60, max_tokens=2))
    for _ in range(3):
        plan = s.schedule()
        # the running decode gets its token every step; the long prompt takes the rest
        assert plan.num_scheduled_tokens["short"] == 1
        assert plan.num_scheduled_tokens["long"] == 15
        s.update(plan, w.execute(plan))


def test_preemption_recomputes_newest_and_everything_finishes():
    s, w = make_scheduler(num_blocks=12, budget=64), TokenCounter()
    for i in range(4):
        s.add_request(request(f"r{i}", 10, max_tokens=12, ignore_eos=True))
    finished = run_to_completion(s, w)
    assert s.num_preemptions > 0
    assert finished == {f"r{i}": ("length", 12) for i in range(4)}
    assert s.kv.pool.num_free_blocks == 12


@pytest.mark.parametrize("caching", [True, False])
def test_random_arrivals_and_aborts_leave_no_leaks(caching):
    rng = random.Random(1234)
    s, w = make_scheduler(num_blocks=24, budget=24, max_seqs=5, caching=caching), TokenCounter()
    aborted, next_id = set(), 0
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            s.add_request(request(f"q{next_id}", rng.randint(1, 30), rng.randint(1, 20)))
            next_id += 1
        if s.requests and rng.random() < 0.05:
            rid = rng.choice(list(s.requests))
            assert s.abort([rid])[0].finish_reason == "abort"
            aborted.add(rid)
        plan = s.schedule()
        scheduled = set(plan.num_scheduled_tokens)
        assert scheduled <= set(s.requests)
        assert plan.total_num_scheduled_tokens <= 24
        s.update(plan, w.execute(plan))
        in_use = sum(1 for b in s.kv.pool.blocks if b.ref_cnt > 0)
        assert in_use + s.kv.pool.num_free_blocks == 24
    run_to_completion(s, w)
    assert s.kv.pool.num_free_blocks == 24
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)
    assert not s.running and not s.waiting and not s.requests


def test_stop_conditions():
    s, w = make_scheduler(num_blocks=32), TokenCounter()
    s.add_request(request("len", 4, max_tokens=3))
    s.add_request(request("stoptok", 4, max_tokens=50, stop_token_ids=list(range(1, 51))))
    s.add_request(request("min", 4, max_tokens=50, stop_token_ids=list(range(1, 51)), min_tokens=5))
    finished = {}
    counts = {}
    while s.has_unfinished():
        plan = s.schedule()
        for d in s.update(plan, w.execute(plan)):
            counts[d.req_id] = counts.get(d.req_id, 0) + len(d.new_token_ids)
            if d.finish_reason:
                finished[d.req_id] = (d.finish_reason, d.stop_reason)
    assert finished["len"] == ("length", None) and counts["len"] == 3
    assert finished["stoptok"][0] == "stop" and counts["stoptok"] == 1
    assert counts["min"] == 5


def test_prompt_longer_than_max_model_len_is_rejected():
    with pytest.raises(ValueError, match="max_model_len"):
        Request("x", list(range(300)), SamplingParams(), (EOS,), max_model_len=256)


def test_restarted_workers_recompute_every_request_with_its_tokens():
    """A step lost with its worker, then a fresh worker with a smaller pool: every request
    finishes exactly as if nothing happened, and the new pool ends empty."""

    def scenario(crash_at: int | None) -> dict[str, list[int]]:
        s, w = make_scheduler(num_blocks=40, budget=16), TokenCounter()
        reqs = [request(f"r{i}", 9 + i, max_tokens=10, ignore_eos=True) for i in range(4)]
        for r in reqs:
            s.add_request(r)
        for step in range(6):
            plan = s.schedule()
            if step == crash_at:  # this plan's results never come back
                running = [r.req_id for r in s.running]
                s.restart_workers(30)
                assert not s.running and [r.req_id for r in s.waiting][: len(running)] == running
                assert s.kv.pool.num_free_blocks == len(s.kv.pool.blocks) == 30
                w = TokenCounter()  # the new worker knows nothing
                continue
            s.update(plan, w.execute(plan))
        finished = run_to_completion(s, w)
        assert {rid: reason for rid, (reason, _) in finished.items()} == {r.req_id: "length" for r in reqs}
        assert all(len(r.output_token_ids) == 10 for r in reqs)
        assert s.kv.pool.num_free_blocks == len(s.kv.pool.blocks) == (40 if crash_at is None else 30)
        return {r.req_id: r.output_token_ids for r in reqs}

    assert scenario(crash_at=3) == scenario(crash_at=None)


def test_prefix_cache_evictions_are_counted_across_a_worker_restart():
    """Distinct prompts through a small pool evict cached blocks (the engine exports the count as
    pagedserve_engine_prefix_cache_evictions_total); a restart keeps the count."""
    s, w = make_scheduler(num_blocks=12), TokenCounter()
    for i in range(6):  # prompts sharing nothing: each needs fresh blocks
        prompt = [(i * 11 + k) % 50 + 1 for k in range(16)]
        s.add_request(Request(f"e{i}", prompt, SamplingParams(max_tokens=2), (EOS,), max_model_len=256))
        run_to_completion(s, w)
    evicted = s.kv.pool.num_evictions
    assert evicted > 0
    s.restart_workers(12)
    assert s.kv.pool.num_evictions == evicted


# ----- adapter slots (--max-loras): no head-of-line blocking, no starvation -----------------------

ADAPTER_A, ADAPTER_B = LoRARequest("a", 1, "/adapters/a"), LoRARequest("b", 2, "/adapters/b")


def lora_request(rid: str, lora: LoRARequest | None, max_tokens: int = 20) -> Request:
    return Request(rid, [3, 4, 5, 6], SamplingParams(max_tokens=max_tokens, ignore_eos=True), (EOS,),
                   max_model_len=256, lora_request=lora)


def lora_step(s: Scheduler, w: TokenCounter) -> set[str]:
    """One step; the requests it ran (never more adapters than slots)."""
    plan = s.schedule()
    ran = set(plan.num_scheduled_tokens)
    assert len({s.requests[r].lora_request for r in ran} - {None}) <= s.max_loras
    s.update(plan, w.execute(plan))
    return ran


def test_a_request_waiting_for_an_adapter_slot_does_not_block_the_queue():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), CacheConfig(block_size=4), 64,
                  max_loras=1)
    w = TokenCounter()
    s.add_request(lora_request("a1", ADAPTER_A))
    lora_step(s, w)
    for rid, lora in (("b", ADAPTER_B), ("base", None), ("a2", ADAPTER_A)):
        s.add_request(lora_request(rid, lora))
    assert lora_step(s, w) == {"a1", "base", "a2"}  # b's adapter has no slot; those behind it start
    assert [r.req_id for r in s.waiting] == ["b"]
    steps = [lora_step(s, w) for _ in range(60) if s.has_unfinished()]
    first_b = next(i for i, ran in enumerate(steps) if "b" in ran)
    assert not any(r.startswith("a") for r in steps[first_b])  # it starts once adapter a is done
    assert not s.has_unfinished() and s.kv.pool.num_free_blocks == 64


def test_a_passed_over_request_is_not_starved_by_a_busy_adapter():
    """Adapter a never idles (a new request for it every step): after b has been passed over
    MAX_PASSES times, a's new requests wait, a drains, and b starts; the base model's go on."""
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), CacheConfig(block_size=4), 64,
                  max_loras=1)
    w = TokenCounter()
    s.add_request(lora_request("a-0", ADAPTER_A, max_tokens=4))
    lora_step(s, w)
    s.add_request(lora_request("b", ADAPTER_B, max_tokens=4))
    steps = []
    for i in range(MAX_PASSES + 20):
        s.add_request(lora_request(f"a{i}", ADAPTER_A, max_tokens=4))
        s.add_request(lora_request(f"base{i}", None, max_tokens=4))
        steps.append(lora_step(s, w))
        if "b" in steps[-1]:
            break
    assert "b" in steps[-1] and len(steps) > MAX_PASSES
    assert any(r.startswith("a") for r in steps[MAX_PASSES - 2])  # a kept running while b waited its turns
    assert all(any(r.startswith("base") for r in ran) for ran in steps[MAX_PASSES:])  # the base model went on
