"""An error that belongs to one request fails that request alone: the others in its steps get the
same tokens as without it, its blocks go back to the pool, and the worker carries on. Driven
through the offline engine (the real scheduler and model runner), and with hostile step plans
straight into the model runner."""

from __future__ import annotations

import time

import numpy as np
import pytest
from msgspec.structs import replace

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from services.worker.grammar_compiler import COMPILE_TIMEOUT_S, MAX_CONSTRAINT_CHARS
from shared.protocol import CachedRequestData

GOOD = {
    "greedy": ([11, 12, 13], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
    "seeded": ([40, 41, 42, 43, 44], SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=2)),
    "penalized": ([7, 8, 9, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3,
                                               logit_bias={100: 5.0})),
}


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(str(model_dirs("llama")))


def run(llm: LLM, requests: dict) -> dict[str, tuple[str | None, list[int], str | None]]:
    """Admit every request, step the engine until all finish: req_id -> (finish reason, tokens, error)."""
    core = llm.engine
    for req_id, (prompt, params) in requests.items():
        core.add_request(core.make_request(req_id, prompt, params))
    got = {req_id: [None, [], None] for req_id in requests}
    while core.has_unfinished():
        for delta in core.step():
            got[delta.req_id][1] += delta.new_token_ids
            if delta.finish_reason is not None:
                got[delta.req_id][0], got[delta.req_id][2] = delta.finish_reason, delta.error
    return {req_id: tuple(v) for req_id, v in got.items()}


def test_bad_requests_fail_alone_among_good_ones(llm):
    alone = run(llm, GOOD)
    bad = {
        "bad-schema": ([11, 12, 13], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "x"}))),
        # divides the prompt tokens' positive logits into +inf: nothing left to sample from
        "inf-penalty": ([30, 31, 32], SamplingParams(temperature=0.5, repetition_penalty=1e-45)),
        # compiles, but its matcher allows no token at all
        "empty-grammar": ([11, 12], SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= root"))),
    }
    mixed = run(llm, {**bad, **GOOD})
    for req_id in GOOD:
        assert mixed[req_id] == alone[req_id] and alone[req_id][0] == "length"
    for req_id in bad:
        reason, tokens, _ = mixed[req_id]
        assert reason == "error" and tokens == [], req_id
    assert "cannot be compiled" in mixed["bad-schema"][2]
    for req_id in ("inf-penalty", "empty-grammar"):
        assert mixed[req_id][2].startswith("no token can be sampled"), mixed[req_id]
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.runner.num_blocks


def test_hostile_plan_entries_fail_alone(llm):
    """Ids and counts valid on the wire that would index the KV cache or the embedding out of
    range, or make the step's tensors disagree in shape, fail their own entry; the good request beside them (whose
    blocks they name) runs on and finishes with the tokens it has alone."""
    prompt, params = GOOD["greedy"]
    expected = run(llm, {"ref": (prompt, params)})["ref"]
    core, runner = llm.engine, llm.runner
    core.add_request(core.make_request("good", prompt, params))
    plan = core.scheduler.schedule()
    good = plan.new_requests[0]
    max_len = llm.config.model.max_model_len
    hostile = {
        "block-range": replace(good, req_id="block-range", block_ids=[runner.num_blocks]),
        "token-range": replace(good, req_id="token-range", prompt_token_ids=np.array([11, 10**6, 13], np.int32)),
        "all-computed": replace(good, req_id="all-computed", num_computed_tokens=3),
        "overrun": replace(good, req_id="overrun"),
        "past-max-len": replace(good, req_id="past-max-len", prompt_token_ids=np.full(max_len + 1, 11, np.int32),
                                block_ids=good.block_ids * (max_len // core.scheduler.kv.block_size + 1)),
    }
    plan.new_requests.extend(hostile.values())
    plan.cached_requests.append(CachedRequestData("ghost", [], 0))
    plan.num_scheduled_tokens.update({req_id: 3 for req_id in hostile}, overrun=40, ghost=1)
    plan.num_scheduled_tokens["past-max-len"] = max_len + 1
    result = runner.execute(plan)
    assert set(result.failed) == {*hostile, "ghost"}
    assert "block ids" in result.failed["block-range"] and "token ids" in result.failed["token-range"]
    assert "40 tokens" in result.failed["overrun"] and "no state" in result.failed["ghost"]
    assert "max_model_len" in result.failed["past-max-len"]
    assert result.req_ids == ["good"] and set(runner.table.states) == {"good"}
    tokens = [t for d in core.scheduler.update(plan, result) for t in d.new_token_ids]
    while core.has_unfinished():
        tokens += [t for d in core.step() for t in d.new_token_ids]
    assert tokens == expected[1]
    assert core.scheduler.kv.pool.num_free_blocks == runner.num_blocks


def test_a_constraint_too_slow_to_compile_fails_alone(llm):
    """A constraint longer than the limit fails at once. One long literal below it still takes
    seconds to compile: past the compile timeout its request fails alone and the step goes on;
    while that compile still runs, a new constraint fails at once and a cached one is served;
    once it is over, constraints compile again."""
    compiler = llm.runner.structured.compiler
    cached = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+"))
    before = run(llm, {"cached": ([11, 12], cached)})["cached"]
    alone = run(llm, GOOD)
    new = ([11, 12], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="c+")))
    slow = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["x" * 60_000]))
    too_long = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["x" * MAX_CONSTRAINT_CHARS]))
    compiler.compile_timeout_s = 0.3
    try:  # admitted together, so "new" and "cached" come right after "slow" in one step
        mixed = run(llm, {"slow": ([11, 12], slow), "new": new, "cached": ([11, 12], cached),
                          "too-long": ([11, 12], too_long), **GOOD})
    finally:
        compiler.compile_timeout_s = COMPILE_TIMEOUT_S
    assert mixed["slow"][0] == "error" and "took longer than 0.3s" in mixed["slow"][2]
    assert mixed["new"][0] == "error" and "still busy" in mixed["new"][2]
    assert mixed["cached"] == before and before[0] == "stop"
    assert mixed["too-long"][0] == "error" and f"at most {MAX_CONSTRAINT_CHARS} characters" in mixed["too-long"][2]
    assert {r: mixed[r] for r in GOOD} == alone
    deadline = time.monotonic() + 600
    while (later := run(llm, {"later": new})["later"])[0] == "error" and time.monotonic() < deadline:
        time.sleep(1)
    assert later[0] in ("stop", "length") and set(llm.tokenizer.decode(later[1], skip_special_tokens=True)) <= {"c"}
