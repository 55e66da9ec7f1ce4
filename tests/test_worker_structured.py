"""Structured outputs at their edges: a grammar that completes before max_tokens (with ignore_eos
or min_tokens pulling the other way) ends its request with "stop" and fails nothing else, and
json_object gives a JSON object, never another JSON value."""

from __future__ import annotations

import json

import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from shared.protocol import CachedRequestData, StepPlan

S = StructuredOutputsParams
BESIDE = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)  # an unrelated request in the batch


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(str(model_dirs("llama")))


def test_a_terminated_grammar_is_reported_stopped_and_never_advanced_again(llm):
    """Worker side: the stop token the grammar allows last terminates its matcher, the request is
    reported in StepResult.stopped, and a step that still schedules it (an engine a step late)
    neither masks nor advances the terminated matcher."""
    core, runner = llm.engine, llm.runner
    core.add_request(core.make_request("a-only", [11, 12], SamplingParams(
        max_tokens=5, ignore_eos=True, structured_outputs=S(regex="a"))))
    a_token = llm.tokenizer.encode("a", add_special_tokens=False)
    results = []
    for _ in range(2):
        plan = core.scheduler.schedule()
        results.append(runner.execute(plan))
        core.scheduler.update(plan, results[-1])
    assert [r.sampled_token_ids for r in results] == [a_token, results[1].sampled_token_ids]
    assert results[1].sampled_token_ids[0] in llm.config.model.eos_token_ids
    assert [r.stopped for r in results] == [[], ["a-only"]] and not any(r.failed for r in results)
    state = runner.table.states["a-only"]
    late = StepPlan(plan.step_id + 1, [], [CachedRequestData("a-only", [], state.num_computed_tokens)],
                    {"a-only": 1}, [])
    again = runner.execute(late)
    assert again.req_ids == ["a-only"] and again.failed == {} and again.stopped == []
    core.abort(["a-only"])  # if the engine has not finished it
    assert core.scheduler.kv.pool.num_free_blocks == runner.num_blocks


@pytest.mark.parametrize(
    ("params", "texts"),
    [
        (SamplingParams(max_tokens=5, ignore_eos=True, structured_outputs=S(regex="a")), ["a"]),
        (SamplingParams(max_tokens=5, ignore_eos=True, structured_outputs=S(choice=["ab", "ba"])), ["ab", "ba"]),
        (SamplingParams(max_tokens=5, min_tokens=4, structured_outputs=S(choice=["a"])), ["a"]),
        (SamplingParams(max_tokens=9, min_tokens=6, temperature=0, structured_outputs=S(json={"type": "boolean"})),
         ["true", "false"]),
        (SamplingParams(max_tokens=6, min_tokens=6, ignore_eos=True, structured_outputs=S(regex="[ab]{2}")),
         ["aa", "ab", "ba", "bb"]),
    ],
    ids=["regex-ignore-eos", "choice-ignore-eos", "choice-min-tokens", "json-min-tokens", "both"],
)
def test_a_completed_grammar_stops_its_request_alone(llm, params, texts):
    alone = llm.generate({"prompt_token_ids": [21, 22, 23]}, BESIDE, use_tqdm=False)[0].outputs[0]
    outs = llm.generate(
        [{"prompt_token_ids": [11, 12]}, {"prompt_token_ids": [21, 22, 23]}], [params, BESIDE], use_tqdm=False
    )
    constrained, beside = outs[0].outputs[0], outs[1].outputs[0]
    assert constrained.text in texts and constrained.finish_reason == "stop"
    assert constrained.token_ids[-1] in llm.config.model.eos_token_ids  # the stop the grammar allowed
    assert (beside.token_ids, beside.finish_reason) == (alone.token_ids, "length")
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.runner.num_blocks


def test_json_object_is_always_an_object(llm):
    """Biased towards '[' and ']', json_object still opens an object (xgrammar's builtin JSON
    grammar, used before, allowed an array); unbiased samples that finish parse as objects too."""
    ids = {c: llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "[]}"}
    as_object = S(json_object=True)
    biased = SamplingParams(temperature=0, max_tokens=10, structured_outputs=as_object,
                            logit_bias={ids["["]: 30.0, ids["]"]: 30.0, ids["}"]: 20.0})
    out = llm.generate("x", biased, use_tqdm=False)[0].outputs[0]
    assert (json.loads(out.text), out.finish_reason) == ({}, "stop")
    sampled = [SamplingParams(temperature=1.0, seed=seed, max_tokens=40, structured_outputs=as_object)
               for seed in range(6)]
    outs = [o.outputs[0] for o in llm.generate(["x"] * 6, sampled, use_tqdm=False)]
    assert all(o.text.lstrip().startswith("{") for o in outs)
    finished = [json.loads(o.text) for o in outs if o.finish_reason == "stop"]
    assert finished and all(isinstance(v, dict) for v in finished)
