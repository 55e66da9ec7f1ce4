"""Scheduler behaviour the hardening work added: resumptions, grammar stops, priorities."""

from __future__ import annotations

import pytest
from test_scheduler import EOS, TokenCounter, make_scheduler, request, run_to_completion

from services.engine.request import Request
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
