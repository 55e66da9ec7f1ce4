"""Speculative decoding with async scheduling over the real model runner, in one process: the
engine plans a request's next step before this step's tokens reach it, so the worker proposes
(ngram, suffix, draft_model) from its own copy of the tokens into slots the engine reserved, and
the engine settles the accepted count one step late. Every kind of request ends with the outputs
of plain (synchronous, non-speculative) decoding, with chunked prefill, prefix caching, a pool
small enough to preempt and aborts mid-run; the KV blocks of rejected proposals and of tokens
past a finish go back to the pool; a large batch turns speculation off.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from engine_outputs import assert_same_outputs, collect_outputs
from test_spec_decode import PARAMS, generate, run_requests

from services.engine.core import EngineCore
from services.engine.request import Request
from services.engine.scheduler import Scheduler
from services.engine.spec_decode import COMPUTE_BOUND_BATCH
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.protocol import StepResult
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

SETUPS = {"roomy": (128, 48), "preempting": (24, 20)}  # (KV blocks, token budget per step)
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)
SUFFIX = SpeculativeConfig(method="suffix", num_speculative_tokens=4)


@pytest.fixture(scope="module")
def model(model_dirs) -> str:
    return str(model_dirs("llama", attention_scale=0.005))  # greedy output loops: proposals get accepted


def make_runner(model: str, spec: SpeculativeConfig | None, async_scheduling: bool):
    from services.worker.model_runner import ModelRunner

    config = EngineConfig(ModelConfig.from_pretrained(model, max_model_len=160),
                          CacheConfig(kv_cache_memory=8 << 20, block_size=8),
                          SchedulerConfig(async_scheduling=async_scheduling), speculative=spec)
    return ModelRunner(config)


@pytest.fixture(scope="module")
def plain_runner(model):
    return make_runner(model, None, False)


@pytest.fixture(scope="module")
def plain(plain_runner):
    """Synchronous non-speculative outputs per setup."""
    return {name: generate(plain_runner, None, *setup)[0] for name, setup in SETUPS.items()}


def generate_async(runner, num_blocks: int, budget: int, abort: tuple[str, ...] = (),
                   config: EngineConfig | None = None) -> tuple[dict, EngineCore]:
    """test_spec_decode.generate's requests with async scheduling: after every step no request
    holds blocks past its known tokens and those its steps in flight may still write (rejected
    proposals' blocks went back); at the end every block is back. abort: requests aborted once
    they have output, with steps in flight. config: the engine's (default: the runner's)."""
    runner.reset()
    scheduler = SchedulerConfig(max_num_batched_tokens=budget, async_scheduling=True)
    engine = EngineCore(dataclasses.replace(config or runner.config, scheduler=scheduler), runner, num_blocks)
    for i, (name, params) in enumerate(PARAMS.items()):
        for j in range(2):  # the same prompt twice: the second hits the prefix cache
            engine.add_request(engine.make_request(f"{name}-{j}", [(k * 31 + 17 * i) % 400 + 3 for k in range(9 + 7 * i)],
                                                   params))
    s, bs, aborted = engine.scheduler, runner.config.cache.block_size, {}

    def after_step(engine: EngineCore) -> None:
        for request in s.running:
            most = request.num_tokens + s.placeholders.get(request.req_id, 0)
            assert len(s.kv.block_ids(request.req_id)) <= -(-most // bs), request.req_id
        for req_id in abort:
            request = s.requests.get(req_id)
            if request is not None and request.num_output_tokens and engine.in_flight:
                aborted[req_id] = engine.abort([req_id])

    out = collect_outputs(engine, after_step)
    for req_id, (delta,) in aborted.items():
        out[req_id]["finish"] = (delta.finish_reason, None, None)
    assert s.kv.pool.num_free_blocks == num_blocks and not s.placeholders and not engine.in_flight
    assert aborted.keys() == set(abort)
    return out, engine


@pytest.fixture(scope="module")
def runners(model):
    made = {}

    def get(method: str):
        if method not in made:
            made[method] = make_runner(model, NGRAM if method == "ngram" else SUFFIX, True)
        return made[method]

    return get


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_async_speculation_gives_the_plain_outputs(runners, plain, method, setup):
    out, engine = generate_async(runners(method), *SETUPS[setup])
    assert_same_outputs(out, plain[setup])
    for name, params in PARAMS.items():
        assert len(out[f"{name}-0"]["tokens"]) <= params.max_tokens
    counts = engine.scheduler.spec
    assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens  # some accepted, some rejected
    if setup == "preempting":
        assert engine.scheduler.num_preemptions > 0
    if method == "suffix":  # the worker's trees went with their requests (the last finishes are told
        # with the next plan); their outputs stayed for later requests
        runner = engine.pipeline.executor
        assert runner.proposer.lookup.trees.keys() <= runner.table.states.keys()
        assert len(runner.proposer.lookup.cached) >= len(PARAMS) * 2 - len(runner.table.states)


def test_a_worker_started_without_speculation_still_gives_the_plain_outputs(plain_runner, plain):
    """The engine reserves slots for proposals this worker never makes: it computes the one token."""
    engine_config = dataclasses.replace(plain_runner.config, speculative=NGRAM)
    out, engine = generate_async(plain_runner, *SETUPS["roomy"], config=engine_config)
    assert_same_outputs(out, plain["roomy"])
    assert engine.scheduler.spec.num_draft_tokens == 0


def test_aborts_with_steps_in_flight_free_every_block(runners, plain):
    aborted = ("greedy-0", "logprobs-1", "penalty-0")
    out, _ = generate_async(runners("ngram"), *SETUPS["roomy"], abort=aborted)
    kept = {r: o for r, o in plain["roomy"].items() if r not in aborted}
    assert_same_outputs({r: out[r] for r in kept}, kept)
    for req_id in aborted:  # what it got before the abort is the start of the plain output
        got, full = out[req_id]["tokens"], plain["roomy"][req_id]["tokens"]
        assert out[req_id]["finish"][0] == "abort" and 0 < len(got) < len(full) and full[: len(got)] == got


def test_llm_async_speculation_keeps_texts_with_n_and_stop_strings(model):
    from pagedserve import LLM

    llms = [LLM(model, max_model_len=160, kv_cache_memory=8 << 20, speculative_config=c, async_scheduling=a)
            for c, a in ((None, False), ({"method": "ngram", "num_speculative_tokens": 4}, True),
                         ({"method": "suffix"}, True))]
    prompts = ["the cat sat on the mat, the cat sat on the mat", "hello"]
    params = SamplingParams(temperature=0, max_tokens=40, n=2, ignore_eos=True, logprobs=2)
    plain, *specs = (llm.generate(prompts, params, use_tqdm=False) for llm in llms)
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a string the output reaches mid-way
    stopped = msgspec.structs.replace(params, stop=[stop])
    plain_stop, *specs_stop = (llm.generate(prompts, stopped, use_tqdm=False) for llm in llms)

    def view(outputs):
        return [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]

    for a, b in [(plain, spec) for spec in specs] + [(plain_stop, spec) for spec in specs_stop]:
        assert view(b) == view(a)
        for x, y in zip(a, b):
            for cx, cy in zip(x.outputs, y.outputs):
                for lx, ly in zip(cx.logprobs, cy.logprobs):
                    assert lx.keys() == ly.keys()
                    assert all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)
    for llm, spec_stop in zip(llms[1:], specs_stop):
        assert spec_stop[0].outputs[0].finish_reason == "stop" and stop not in spec_stop[0].outputs[0].text
        assert llm.engine.scheduler.spec.num_accepted_tokens > 0


def async_scheduler(num_blocks: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(async_scheduling=True), CacheConfig(block_size=4), num_blocks, speculative=NGRAM)


def test_a_verification_reserves_slots_and_is_settled_one_step_late():
    s = async_scheduler()
    s.add_request(Request("r", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
    p1 = s.schedule()  # the prompt: the worker then proposes 4 tokens (1/2 ** 4 holds at batch 1)
    assert p1.num_draft_tokens == {"r": 4}
    p2 = s.schedule()  # planned before p1's result: 4 slots for the worker's proposals
    assert p2.num_scheduled_tokens == {"r": 5} and not p2.spec_token_ids
    assert p2.num_draft_tokens == {}  # its first proposals are in flight: it waits for how they fare
    s.update(p1, StepResult(p1.step_id, ["r"], [5]))
    p3 = s.schedule()  # planned before p2's result, as if all 4 were accepted
    assert p3.num_scheduled_tokens == {"r": 1} and p3.cached_requests[0].num_computed_tokens == 17
    assert p3.num_draft_tokens == {}  # its first proposals are still in flight: not probed a second time
    request = s.requests["r"]
    assert len(s.kv.block_ids("r")) == 5  # positions up to 17 may be written
    s.update(p2, StepResult(p2.step_id, ["r"] * 3, [6, 7, 9], num_proposed={"r": 4}))  # 2 of 4 accepted
    # 16 tokens; p3 writes position 15 (the worker's own count): the block past it went back
    assert request.num_tokens == 16 and request.num_computed_tokens == 16 and s.placeholders == {"r": 1}
    assert len(s.kv.block_ids("r")) == 4 and s.kv.pool.num_free_blocks == 12
    assert (s.spec.num_drafts, s.spec.num_draft_tokens, s.spec.num_accepted_tokens) == (1, 4, 2)
    s.update(p3, StepResult(p3.step_id, ["r"], [3]))
    p4 = s.schedule()  # the worker is told to keep 4 blocks
    assert p4.cached_requests[0].num_kept_blocks == 4 and p4.cached_requests[0].num_computed_tokens == 16
    assert p4.num_draft_tokens == {"r": 4}  # 2 of 4 held: it proposes again


@pytest.mark.parametrize(("max_tokens", "stop", "proposed", "got", "kept", "finish"), [
    (50, [7], 4, [6, 7, 8], [6, 7], "stop"),  # a stop id inside the accepted run
    (3, [], 1, [6, 7], [6, 7], "length"),  # max_tokens leaves room for one proposal, reached at the last token
])
def test_a_finish_inside_a_verification_drops_the_rest_and_every_block(max_tokens, stop, proposed, got, kept, finish):
    s = async_scheduler()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stop)
    s.add_request(Request("r", [5, 6, 7, 8] * 3, params, (0,), 64))
    p1 = s.schedule()
    p2 = s.schedule()
    assert p2.num_scheduled_tokens["r"] == 1 + min(4, max_tokens - 1 - 1)  # room left under max_tokens
    s.update(p1, StepResult(p1.step_id, ["r"], [5]))
    p3 = s.schedule()  # in flight when r finishes: its token is discarded (none when max_tokens is in flight)
    assert bool(p3.num_scheduled_tokens) == (max_tokens == 50)
    (delta,) = s.update(p2, StepResult(p2.step_id, ["r"] * len(got), got, num_proposed={"r": proposed}))
    assert delta.new_token_ids == kept and delta.finish_reason == finish
    assert s.update(p3, StepResult(p3.step_id, ["r"] if p3.num_scheduled_tokens else [], [4][: len(p3.num_scheduled_tokens)])) == []
    assert s.kv.pool.num_free_blocks == 16 and not s.placeholders and not s.has_unfinished()


def test_a_large_batch_turns_speculation_off():
    for num_requests, proposing in ((1, True), (COMPUTE_BOUND_BATCH, False)):
        s = async_scheduler(num_blocks=256)
        for i in range(num_requests):
            s.add_request(Request(f"r{i}", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=50), (0,), 64))
        plans = [s.schedule() for _ in range(2)]
        assert bool(plans[0].num_draft_tokens) == proposing
        assert max(plans[1].num_scheduled_tokens.values()) == (5 if proposing else 1)



@pytest.mark.parametrize("method", ["suffix", "draft_model"])
def test_async_speculation_over_tensor_parallel_ranks_gives_one_ranks_outputs(model, plain, method):
    """Each rank proposes alike from its own copy of the tokens: suffix from its own trees (ngram
    takes the same path on the worker, without them), a draft model (the target itself here)
    sharded over the ranks."""
    from pagedserve import LLM

    spec = {"suffix": SUFFIX,
            "draft_model": SpeculativeConfig(method="draft_model", model=model, num_speculative_tokens=4, draft_cost=0)}
    setup = {"max_model_len": 160, "kv_cache_memory": 8 << 20, "block_size": 8, "max_num_batched_tokens": 48}
    with LLM(model, tensor_parallel_size=2, async_scheduling=True, speculative_config=dataclasses.asdict(spec[method]),
             **setup) as llm:
        got = run_requests(llm.engine, llm.runner.num_blocks, copies=1)
        counts = llm.engine.scheduler.spec
    assert_same_outputs(got, {r: o for r, o in plain["roomy"].items() if r.endswith("-0")})
    assert counts.on_workers and counts.num_accepted_tokens > 0
    # a twin draft's proposals hold (cut where a grammar forbids them); suffix's both hold and fail
    assert (counts.num_accepted_tokens == counts.num_draft_tokens) == (method == "draft_model")


def test_over_pipeline_stages_the_engine_proposes():
    """A request is in one step in flight at most there, so its proposals can be made where its
    tokens are known, and every stage gets them with the plan."""
    s = Scheduler(SchedulerConfig(async_scheduling=True), CacheConfig(block_size=4), 16, speculative=NGRAM,
                  micro_batches=2)
    s.add_request(Request("r", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
    p1 = s.schedule()
    assert not s.spec.on_workers and not p1.num_draft_tokens and not s.schedule().num_scheduled_tokens
    s.update(p1, StepResult(p1.step_id, ["r"], [5]))
    assert s.schedule().spec_token_ids["r"].tolist() == [6, 7, 8, 5]  # what followed the latest [..., 8, 5]
