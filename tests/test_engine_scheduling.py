"""Scheduler behaviour the hardening work added: resumptions, grammar stops, priorities."""

from __future__ import annotations

import time

import pytest
from test_scheduler import EOS, TokenCounter, make_scheduler, request, run_to_completion

from services.engine.request import Request
from services.engine.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.protocol import StepResult
from shared.sampling_params import SamplingParams


def outputs_of(s, w, reqs: list[Request]) -> dict[str, tuple[str, list[int]]]:
    for r in reqs:
        s.add_request(r)
    finished = run_to_completion(s, w)
    return {r.req_id: (finished[r.req_id][0], r.output_token_ids) for r in reqs}


def test_a_resumption_continues_exactly_where_it_left_off():
    whole = outputs_of(make_scheduler(64), TokenCounter(), [request("r", 9, max_tokens=10, ignore_eos=True)])
    reason, tokens = whole["r"]
    assert reason == "length" and len(tokens) == 10
    s, w = make_scheduler(64), TokenCounter()
    resumed = request("r", 9, max_tokens=10, ignore_eos=True)
    resumed = Request("r", resumed.prompt_token_ids, resumed.sampling_params, (EOS,), 256, output_token_ids=tokens[:4])
    counts: list[int] = []
    s.add_request(resumed)
    while s.has_unfinished():
        plan = s.schedule()
        counts += [len(d.new_token_ids) for d in s.update(plan, w.execute(plan))]
    # the four tokens it had count against max_tokens: six more, and the same six
    assert sum(counts) == 6 and resumed.output_token_ids == tokens
    assert s.kv.pool.num_free_blocks == 64


def test_resumed_tokens_count_against_min_tokens_and_max_tokens():
    params = SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=list(range(1, 51)))
    # two tokens already: one more reaches min_tokens, and that token (in 1..50) stops it
    s, w = make_scheduler(64), TokenCounter()
    r = Request("m", [5, 6, 7], params, (EOS,), 256, output_token_ids=[9, 9])
    assert outputs_of(s, w, [r])["m"][0] == "stop" and len(r.output_token_ids) == 3
    with pytest.raises(ValueError, match="no room left"):
        Request("full", [5, 6, 7], params, (EOS,), 256, output_token_ids=[9] * 5)


def test_a_resumption_does_not_score_its_prompt_again():
    params = SamplingParams(max_tokens=5, prompt_logprobs=1)
    assert Request("p", [5, 6], params, (EOS,), 256).prompt_logprobs == []
    assert Request("p", [5, 6], params, (EOS,), 256, output_token_ids=[7]).prompt_logprobs is None


def test_a_completed_grammar_stops_its_request_with_that_token():
    s, w = make_scheduler(64), TokenCounter()
    s.add_request(request("g", 4, max_tokens=50, ignore_eos=True))
    s.add_request(request("other", 5, max_tokens=50, ignore_eos=True))
    plan = s.schedule()
    result = w.execute(plan)
    result = StepResult(result.step_id, result.req_ids, result.sampled_token_ids, stopped=["g"])
    deltas = {d.req_id: d for d in s.update(plan, result)}
    assert deltas["g"].finish_reason == "stop" and deltas["g"].new_token_ids == result.sampled_token_ids[:1]
    assert deltas["other"].finish_reason is None
    assert list(s.requests) == ["other"]


def priority_scheduler(num_blocks: int, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(policy="priority", **kw), CacheConfig(block_size=4), num_blocks)


def test_priority_policy_admits_by_priority_then_arrival():
    s, w = priority_scheduler(64, max_num_seqs=1), TokenCounter()
    for i, prio in enumerate([5, 1, 5, 0, 1]):
        r = request(f"r{i}", 3, max_tokens=1)
        r.priority = prio
        s.add_request(r)
    order = []
    while s.has_unfinished():
        plan = s.schedule()
        order += [rid for rid in plan.num_scheduled_tokens if rid not in order]
        s.update(plan, w.execute(plan))
    assert order == ["r3", "r1", "r4", "r0", "r2"]


def test_priority_policy_preempts_the_largest_priority_first():
    s, w = priority_scheduler(10), TokenCounter()
    for rid, prio in (("low", 9), ("high", 0), ("mid", 4)):
        r = request(rid, 8, max_tokens=12, ignore_eos=True)
        r.priority = prio
        s.add_request(r)
    plan = s.schedule()
    assert list(plan.num_scheduled_tokens) == ["high", "mid", "low"]
    s.update(plan, w.execute(plan))
    preempted = []
    while s.has_unfinished():
        before = {r.req_id for r in s.running}
        plan = s.schedule()
        preempted += [rid for rid in before if rid not in {r.req_id for r in s.running}]
        s.update(plan, w.execute(plan))
    # "low" goes first, and "high" is never preempted
    assert preempted and preempted[0] == "low" and "high" not in preempted
    assert s.kv.pool.num_free_blocks == 10


def test_fcfs_refuses_a_priority_and_preempts_the_newest():
    s, w = make_scheduler(10), TokenCounter()
    r = request("p", 3, max_tokens=1)
    r.priority = 1
    with pytest.raises(ValueError, match="priority scheduling policy"):
        s.add_request(r)
    for rid in ("a", "b", "c"):
        s.add_request(request(rid, 8, max_tokens=12, ignore_eos=True))
    s.update(plan := s.schedule(), w.execute(plan))
    while s.num_preemptions == 0:
        s.update(plan := s.schedule(), w.execute(plan))
    assert s.waiting[0].req_id == "c"


def test_admission_limits_bound_the_waiting_queue():
    s = Scheduler(SchedulerConfig(max_num_queued_requests=2, max_queued_tokens=25), CacheConfig(block_size=4), 64)
    assert s.admission_error(request("a", 10, 5)) is None
    s.add_request(request("a", 10, 5))
    assert s.admission_error(request("big", 16, 5))[0] == "queued_tokens"  # 10 + 16 tokens > 25
    s.add_request(request("b", 15, 5))
    assert s.admission_error(request("c", 1, 5)) == (
        "queued_requests", "the engine's queue is full (2 requests waiting); retry later"
    )
    s.update(plan := s.schedule(), TokenCounter().execute(plan))  # both start: the queue empties
    assert s.admission_error(request("c", 1, 5)) is None


def test_queue_time_and_oldest_waiting_age():
    s = make_scheduler(64, max_seqs=1)
    s.add_request(request("a", 3, 5))
    s.add_request(request("b", 3, 5))
    time.sleep(0.05)
    assert s.oldest_waiting_age() >= 0.05
    s.schedule()
    assert len(s.queue_times) == 1 and s.queue_times[0] >= 0.05
    assert s.oldest_waiting_age() >= 0.05  # "b" still waits
    s.abort(["b"])
    assert s.oldest_waiting_age() == 0.0


def test_offline_priority_runs_the_lowest_value_first(model_dirs):
    """With one sequence at a time and a shared 32-token prefix, the request that runs first is the
    only one that finds nothing in the prefix cache."""
    from pagedserve import LLM

    prefix = list(range(10, 42))
    prompts = [{"prompt_token_ids": prefix + [50 + i, 60 + i]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kw = {"max_model_len": 128, "kv_cache_memory": 8 << 20, "max_num_seqs": 1}
    llm = LLM(str(model_dirs("llama")), scheduling_policy="priority", **kw)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    assert [o.num_cached_tokens for o in outs] == [32, 0, 32]
    fcfs = LLM(str(model_dirs("llama")), **kw)
    same = fcfs.generate(prompts, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in same] == [0, 32, 32]
    assert [o.outputs[0].token_ids for o in same] == [o.outputs[0].token_ids for o in outs]
    with pytest.raises(ValueError, match="scheduling_policy"):
        fcfs.generate(prompts, params, use_tqdm=False, priority=[1, 0, 0])
    with pytest.raises(ValueError, match="got 2 priority for 3 prompts"):
        llm.generate(prompts, params, use_tqdm=False, priority=[1, 0])
