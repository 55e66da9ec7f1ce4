"""How much the draft model drafts (method draft_model): the engine says per request how many
tokens to draft after each step, weighing the draft's cost with the verification's, and the
worker drafts only that many, catching the draft's KV up lazily. Over the real model runner and
engine core, on the tiny 4-layer target of test_spec_decode_draft.py."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
import test_spec_decode_draft as base
import torch
from engine_outputs import collect_outputs

from services.engine.core import EngineCore
from services.engine.spec_decode import COMPUTE_BOUND_BATCH
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

target, draft = base.target, base.draft  # the fixtures: the tiny 4-layer target, its first 2 layers
draft_spec, make_runner = base.draft_spec, base.make_runner
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def run_one(runner, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], EngineCore, list[int]]:
    """One request to the end: its tokens, the engine, and the draft's computed-token count of
    the worker's state after each step (it grows only in steps where the request drafts)."""
    runner.reset()
    engine = EngineCore(runner.config, runner, 64)
    engine.add_request(engine.make_request("one", prompt, params))
    tokens, computed = [], []
    while engine.has_unfinished():
        for d in engine.step():
            tokens += d.new_token_ids
        state = runner.table.states.get("one")
        computed.append(state.num_draft_computed if state is not None else computed[-1])
    return tokens, engine, computed


def test_a_draft_that_does_not_pay_never_runs(target, draft):
    """The tiny 2-layer draft reads most of what its 4-layer target reads (the LM head is
    shared): by default its estimated cost is most of a step, so it never drafts and the worker
    never runs it; the outputs are plain decoding's."""
    from shared.draft_model import DRAFT_STEP_OVERHEAD, draft_cost

    runner = make_runner(target, draft_spec(draft, cost=None))
    model = runner.config.model
    per_layer = 64 * 16 * 2 * (4 + 2) + 3 * 64 * 128  # the tiny llama: attention, gated MLP
    head = model.vocab_size * 64
    expected = (2 * per_layer + head) / (4 * per_layer + head) + DRAFT_STEP_OVERHEAD
    assert draft_cost(runner.config) == pytest.approx(expected)
    tokens, engine, _ = run_one(runner, [17, 256, 3, 98, 5] * 3)
    assert engine.scheduler.spec.num_drafts == 0 and runner.draft.num_forwards == 0
    plain_tokens, _, _ = run_one(make_runner(target, None), [17, 256, 3, 98, 5] * 3)
    assert tokens == plain_tokens


def test_failing_proposals_stop_drafting_and_the_draft_stops_running(target, model_dirs):
    """A draft with other random weights agrees with the target on almost nothing: after a few
    failed verifications the request drafts nothing more, and the worker runs no draft forward
    for it (its draft KV stops advancing) while it decodes on; its output is plain decoding's."""
    stranger = str(model_dirs("llama", seed=7, config_overrides={"num_hidden_layers": 2}))
    runner = make_runner(target, draft_spec(stranger, cost=0.2))
    prompt = [17, 256, 3, 98, 5] * 3
    tokens, engine, computed = run_one(runner, prompt)
    spec = engine.scheduler.spec
    assert 1 <= spec.num_drafts <= 6 and spec.num_accepted_tokens < spec.num_draft_tokens
    assert runner.draft.num_forwards <= spec.num_drafts + 1  # one token a draft: one forward
    last_growth = max(i for i in range(1, len(computed)) if computed[i] > computed[i - 1])
    assert last_growth < len(computed) // 2  # most of the request's steps ran no draft
    assert tokens == run_one(make_runner(target, None), prompt)[0]


def test_drafting_resumes_after_a_gap_with_the_draft_kv_caught_up(target):
    """A draft equal to the target accepts every proposal only while its KV is right. The
    request drafts alone, stops while COMPUTE_BOUND_BATCH more requests run (the step is
    compute-bound), then resumes: the draft catches up the tokens it skipped, and every proposal still holds."""
    runner = make_runner(target, draft_spec(target))
    runner.reset()
    config = dataclasses.replace(runner.config, scheduler=SchedulerConfig(max_num_seqs=2 * COMPUTE_BOUND_BATCH))
    engine = EngineCore(config, runner, 128)
    spec = engine.scheduler.spec
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    engine.add_request(engine.make_request("long", [17, 256, 3, 98, 5] * 2, params))
    state = lambda: runner.table.states["long"]
    while spec.num_accepted_tokens < 8:
        engine.step()
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(COMPUTE_BOUND_BATCH):
        engine.add_request(engine.make_request(f"short-{i}", [i + 3, 40, 7 * i + 9], short))
    engine.step()
    before_gap, drafted = state().num_draft_computed, spec.num_draft_tokens
    while engine.scheduler.num_running > 1:
        assert engine.scheduler.requests["long"].draft_token_ids == []
        engine.step()
    assert state().num_draft_computed == before_gap and spec.num_draft_tokens == drafted  # no draft ran
    gap = len(state().token_ids) - 1 - before_gap
    assert gap >= 3
    collect_outputs(engine)
    assert spec.num_draft_tokens > drafted + 8  # it drafted again
    assert spec.num_accepted_tokens == spec.num_draft_tokens


def test_a_long_prompt_catches_the_draft_up_in_chunks(target):
    """A request's first draft computes its whole prompt: in forwards of at most the step's token
    budget, each chunk's KV right, so a draft equal to the target has every proposal accepted."""
    runner = make_runner(target, draft_spec(target), scheduler=SchedulerConfig(max_num_batched_tokens=16))
    sizes, forward = [], runner.draft._forward

    def counted(rows, spans):
        sizes.append(sum(hi - lo for lo, hi in spans))
        return forward(rows, spans)

    runner.draft._forward = counted
    prompt = [(7 * i + 3) % 250 + 3 for i in range(60)]
    tokens, engine, _ = run_one(runner, prompt)
    spec = engine.scheduler.spec
    assert max(sizes) == 16 and sum(sizes) >= len(prompt)
    assert spec.num_draft_tokens > 8 and spec.num_accepted_tokens == spec.num_draft_tokens
    assert tokens == run_one(make_runner(target, None), prompt)[0]


def test_a_draft_beside_an_fp8_cache(target):
    """The target's KV in fp8, the draft's in the model's dtype (read by a backend of its own):
    a draft equal to the target still has its proposals accepted, and the output is plain
    decoding's with the same fp8 cache."""
    from services.worker.model_runner import ModelRunner

    def fp8_runner(spec: SpeculativeConfig | None) -> ModelRunner:
        model = ModelConfig.from_pretrained(target, max_model_len=160)
        cache = CacheConfig(kv_cache_memory=8 << 20, block_size=8, kv_cache_dtype="fp8")
        return ModelRunner(EngineConfig(model, cache, speculative=spec))

    runner = fp8_runner(draft_spec(target))
    assert runner.kv_caches[0].dtype != runner.draft.kv_caches[0].dtype == torch.float32
    prompt = [17, 256, 3, 98, 5] * 3
    tokens, engine, _ = run_one(runner, prompt)
    assert engine.scheduler.spec.num_accepted_tokens > 8
    assert tokens == run_one(fp8_runner(None), prompt)[0]


def test_a_new_request_drafts_once_until_its_first_proposals_are_verified():
    from services.engine.request import Request
    from services.engine.spec_decode import SpecDecoder

    decoder = SpecDecoder(draft_spec("draft", cost=0.25), draft_cost=0.25)
    request = Request("r", [7, 8] * 10, SamplingParams(max_tokens=50), (0,), 512)
    batch = COMPUTE_BOUND_BATCH // 16  # a step's share: 1/16
    assert decoder.num_to_draft(request, num_running=batch) == 1  # 1/2 >= 1/16 + 1/4 > 1/4
    assert decoder.num_to_draft(request, num_running=batch, num_slots=1) == 0  # one verified in the step planned
    decoder.record(request, 1, 1)
    assert decoder.num_to_draft(request, num_running=batch) == 2  # 2/3 accepted now: 4/9 > 5/16 too
    request.max_tokens = request.num_output_tokens + 2  # room for this step's token and the next one
    assert decoder.num_to_draft(request, num_running=batch) == 0


def test_num_draft_tokens_and_draft_cost_are_checked(target, draft):
    from shared.protocol import EngineToWorker, StepPlan
    from shared.transport import Codec

    with pytest.raises(ValueError, match="does not schedule"):
        StepPlan(1, [], [], {"a": 1}, [], {}, {"b": 2})
    codec = Codec(EngineToWorker)
    assert codec.decode(codec.encode(StepPlan(1, [], [], {"a": 1}, [], {}, {"a": 3}))).num_draft_tokens == {"a": 3}
    for bad in (0, -1, "2"):
        with pytest.raises(ValueError):  # msgspec's ValidationError is a ValueError
            codec.decode(codec.encode(StepPlan(1, [], [], {"a": 1}, [], {}, {"a": bad})))
    model = ModelConfig.from_pretrained(target, max_model_len=160)
    for spec, match in (
        ({"method": "draft_model", "model": draft, "draft_cost": -0.5}, "draft_cost must be a number"),
        ({"method": "draft_model", "model": draft, "draft_cost": True}, "draft_cost must be a number"),
        ({"method": "draft_model", "model": draft, "draft_cost": "cheap"}, "draft_cost must be a number"),
        ({"method": "ngram", "draft_cost": 0.5}, "not used by method"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(spec)
    assert EngineConfig(model, speculative=SpeculativeConfig.parse(
        {"method": "draft_model", "model": draft, "draft_cost": 0.25})).speculative.draft_cost == 0.25


def test_a_huge_draft_count_is_capped_by_the_worker(target):
    """The worker drafts at most num_speculative_tokens, whatever a plan asks."""
    runner = make_runner(target, draft_spec(target, k=3))
    runner.reset()
    from shared.protocol import NewRequestData, StepPlan

    prompt = np.array([17, 256, 3, 98, 5], dtype=np.int32)
    new = NewRequestData("r", prompt, prompt[:0], msgspec.structs.replace(GREEDY), [0], [0], 0)
    result = runner.execute(StepPlan(1, [new], [], {"r": 5}, [], {}, {"r": 10**6}))
    assert result.draft_token_ids["r"].size == 3
