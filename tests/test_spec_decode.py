"""Speculative decoding (ngram) over the real model runner, in one process: every kind of request
ends with the tokens, logprobs and finish reasons of non-speculative decoding, also with chunked
prefill, prefix caching and a tiny KV pool that preempts; proposals are both accepted and
rejected, blocks of rejected tokens go back to the pool at once, and none is left behind.

The checkpoint's attention output projections are damped (make_test_model attention_scale), so
its greedy output falls into loops that break now and then: prompt lookup has something to find.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import msgspec
import pytest
from engine_outputs import assert_same_outputs, collect_outputs

from services.engine.core import EngineCore
from services.engine.request import Request
from services.engine.scheduler import Scheduler
from services.engine.spec_decode import COMPUTE_BOUND_BATCH, STEP_TOKENS, SpecDecoder
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.proposers.ngram import NgramProposer
from shared.protocol import StepResult
from shared.sampling_params import SamplingParams, StructuredOutputsParams
from shared.speculative import SpeculativeConfig

PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
    "max_tokens": SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, max_tokens=30, logprobs=3, stop_token_ids=list(range(0, 900, 37))),
    "seeded": SamplingParams(temperature=1.0, seed=7, max_tokens=30, presence_penalty=0.3, top_k=20, ignore_eos=True),
    "prompt_logprobs": SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2, ignore_eos=True),
    "choice": SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["yes yes yes", "no"])
    ),
    "min_tokens": SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=list(range(0, 900, 5))),
    "penalty": SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
}
SPEC = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)
SPECS = {"ngram": SPEC, "suffix": SpeculativeConfig(method="suffix", num_speculative_tokens=4)}


@pytest.fixture(scope="module")
def runner(model_dirs):
    from services.worker.model_runner import ModelRunner

    model = ModelConfig.from_pretrained(str(model_dirs("llama", attention_scale=0.005)), max_model_len=160)
    return ModelRunner(EngineConfig(model, CacheConfig(kv_cache_memory=8 << 20, block_size=8)))


def generate(runner, spec: SpeculativeConfig | None, num_blocks: int, budget: int = 48) -> tuple[dict, EngineCore]:
    runner.reset()
    config = dataclasses.replace(
        runner.config, scheduler=SchedulerConfig(max_num_batched_tokens=budget), speculative=spec
    )
    engine = EngineCore(config, runner, num_blocks)
    return run_requests(engine, num_blocks), engine


def run_requests(engine: EngineCore, num_blocks: int, copies: int = 2) -> dict:
    """Every kind of request in PARAMS, each prompt `copies` times (the second hits the prefix
    cache), run to the end: their outputs. Blocks of rejected proposals go back at once, and
    every block by the end."""
    for i, (name, params) in enumerate(PARAMS.items()):
        for j in range(copies):
            prompt = [(k * 31 + 17 * i) % 400 + 3 for k in range(9 + 7 * i)]
            engine.add_request(engine.make_request(f"{name}-{j}", prompt, params))
    block_size = engine.config.cache.block_size

    def rejected_blocks_returned(engine: EngineCore) -> None:
        for request in engine.scheduler.running:  # blocks beyond its tokens are for steps in flight
            held = request.num_tokens + engine.scheduler.placeholders.get(request.req_id, 0)
            assert len(engine.scheduler.kv.block_ids(request.req_id)) <= -(-held // block_size)

    out = collect_outputs(engine, rejected_blocks_returned)
    assert engine.scheduler.kv.pool.num_free_blocks == num_blocks
    return out


@pytest.fixture(scope="module")
def plain_runs(runner):
    """Non-speculative runs by (num_blocks, budget), made once for every method."""
    runs: dict = {}

    def get(num_blocks: int, budget: int) -> tuple[dict, EngineCore]:
        if (num_blocks, budget) not in runs:
            runs[num_blocks, budget] = generate(runner, None, num_blocks, budget)
        return runs[num_blocks, budget]

    return get


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize(("num_blocks", "budget"), [(128, 48), (24, 20)], ids=["roomy", "preempting"])
def test_speculation_gives_the_same_outputs(runner, plain_runs, num_blocks, budget, method):
    plain, base = plain_runs(num_blocks, budget)
    spec, engine = generate(runner, SPECS[method], num_blocks, budget)
    assert_same_outputs(spec, plain)
    for name, params in PARAMS.items():
        got = spec[f"{name}-0"]
        assert len(got["tokens"]) <= params.max_tokens
        assert got["finish"][0] in ("stop", "length"), (name, got["finish"])
    counts = engine.scheduler.spec
    assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens  # some accepted, some rejected
    assert counts.accepted_per_position[0] >= counts.accepted_per_position[-1] > 0
    if num_blocks == 24:
        assert engine.scheduler.num_preemptions > 0 and base.scheduler.num_preemptions > 0
    if method == "suffix":  # every request's tree went with it; the outputs stayed for later requests
        assert counts.proposer.trees == {} and len(counts.proposer.cached) == len(PARAMS) * 2


def test_ngram_proposer_finds_the_latest_match_and_follows_loops():
    p = NgramProposer(1, 3)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # latest match of [1, 2, 3]
    assert p.propose([7, 8, 7, 8], 5) == [7, 8, 7, 8, 7]  # a loop continues with its period
    assert p.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert p.propose([5, 5], 3) == [5, 5, 5]
    assert NgramProposer(2, 2).propose([1, 2, 9, 2], 3) == []  # a 1-gram match is below the minimum


def test_speculative_config_is_checked_like_vllms():
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}').num_speculative_tokens == 5
    assert SpeculativeConfig.parse({"method": "ngram", "prompt_lookup_max": 4}).lookup_range == (4, 4)
    for bad, match in (
        ({"method": "medusa"}, "method must be one of"),
        ({"num_speculative_tokens": 3}, "needs a \"method\""),
        ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "must not exceed"),
        ({"method": "ngram", "speculative_token_tree": "[(0,)]"}, "unsupported key"),
        ("[1]", "JSON object"),
        ("{", "JSON object"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)


@pytest.mark.parametrize(("params", "proposed", "got", "kept", "finish"), [
    (SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[7]), [6, 7, 8, 5], [6, 7, 8, 5, 6], [6, 7], "stop"),
    (SamplingParams(temperature=0, max_tokens=50, min_tokens=5, stop_token_ids=[7]), [6, 7, 8, 5], [6, 7, 9], [6, 7, 9],
     None),
    (SamplingParams(temperature=0, max_tokens=3), [6], [6, 7], [6, 7], "length"),
], ids=["stop-id-inside-the-run", "min-tokens", "max-tokens"])
def test_verification_results_end_at_a_stop_and_roll_back_rejected_tokens(params, proposed, got, kept, finish):
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 16, speculative=SPEC)
    scheduler.add_request(Request("r", [5, 6, 7, 8] * 3, params, (0,), 64))
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult(plan.step_id, ["r"], [5]))  # the prompt's step samples 5
    plan = scheduler.schedule()
    assert plan.spec_token_ids["r"].tolist() == proposed  # what followed the latest [..., 8, 5]
    assert plan.num_scheduled_tokens["r"] == 1 + len(proposed)
    (delta,) = scheduler.update(plan, StepResult(plan.step_id, ["r"] * len(got), got, num_proposed={"r": len(proposed)}))
    assert delta.new_token_ids == kept and delta.finish_reason == finish
    if finish is not None:
        assert scheduler.kv.pool.num_free_blocks == 16
        return
    request = scheduler.requests["r"]  # 2 of 4 accepted: the rest's KV is void, its block freed
    assert request.num_computed_tokens == request.num_tokens - 1 == 15
    assert len(scheduler.kv.block_ids("r")) == 4 and scheduler.kv.pool.num_free_blocks == 12
    nxt = scheduler.schedule()  # the worker is told to keep 4 blocks
    assert nxt.cached_requests[0].num_kept_blocks == 4 and nxt.cached_requests[0].num_computed_tokens == 15
    assert scheduler.spec.num_draft_tokens == 4 and scheduler.spec.num_accepted_tokens == 2


# --- rejection sampling keeps the target distribution -------------------------------------

SAMPLED = {
    "top-k": SamplingParams(temperature=0.8, top_k=4, max_tokens=3, ignore_eos=True),
    "top-p-min-p-penalties-bias": SamplingParams(
        temperature=0.7, top_p=0.9, min_p=0.05, presence_penalty=0.2, frequency_penalty=0.1, repetition_penalty=1.05,
        logit_bias={949: 0.5, 3: -0.5}, max_tokens=3, ignore_eos=True,
    ),
}
NUM_SAMPLES = 400


def sample_positions(runner, spec: SpeculativeConfig | None, prompt: list[int], params: SamplingParams):
    """NUM_SAMPLES unseeded samples of the same prompt: the counts of output tokens 2 and 3 (the
    ones speculation proposes), and the engine."""
    runner.reset()
    config = dataclasses.replace(runner.config, scheduler=SchedulerConfig(max_num_seqs=8), speculative=spec)
    engine = EngineCore(config, runner, 256)
    for i in range(NUM_SAMPLES):
        engine.add_request(engine.make_request(f"s{i}", prompt, params))
    out = collect_outputs(engine)
    return [Counter(o["tokens"][pos] for o in out.values()) for pos in (1, 2)], engine


def homogeneous(a: Counter, b: Counter) -> bool:
    """Chi-square test of homogeneity of two samples at the 0.1% level (rare cells pooled; the
    quantile by the Wilson-Hilferty approximation)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    common = [t for t in a.keys() | b.keys() if a[t] + b[t] >= 10]
    cells = [(a[t], b[t]) for t in common] + [(total_a - sum(a[t] for t in common), total_b - sum(b[t] for t in common))]
    cells = [c for c in cells if sum(c)]
    stat = 0.0
    for x, y in cells:
        expected_a = (x + y) * total_a / (total_a + total_b)
        expected_b = (x + y) - expected_a
        stat += (x - expected_a) ** 2 / expected_a + (y - expected_b) ** 2 / expected_b
    df = max(1, len(cells) - 1)
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical


@pytest.mark.parametrize("name", list(SAMPLED))
def test_speculation_keeps_the_sampling_distribution(runner, name):
    greedy, _ = generate_one(runner, [17, 256, 3, 98], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    prompt = [17, 256, 3, 98] + greedy  # the model's own greedy chain: proposals are often right
    params = SAMPLED[name]
    plain, _ = sample_positions(runner, None, prompt, params)
    spec, engine = sample_positions(runner, SPEC, prompt, params)
    counts = engine.scheduler.spec
    assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens
    assert all(homogeneous(s, p) for s, p in zip(spec, plain)), (spec, plain)
    hotter, _ = sample_positions(runner, SPEC, prompt, msgspec.structs.replace(params, temperature=3.0))
    assert not all(homogeneous(h, p) for h, p in zip(hotter, plain))  # the test tells distributions apart


def generate_one(runner, prompt: list[int], params: SamplingParams) -> tuple[list[int], EngineCore]:
    runner.reset()
    engine = EngineCore(runner.config, runner, 64)
    engine.add_request(engine.make_request("one", prompt, params))
    return collect_outputs(engine)["one"]["tokens"], engine


def test_proposals_adapt_to_acceptance_and_turn_off_in_a_large_batch():
    decoder = SpecDecoder(SpeculativeConfig(num_speculative_tokens=5))
    looping = Request("r", [7, 8] * 20, SamplingParams(max_tokens=100), (0,), 512)
    # no measurement yet (alpha 1/2): at a sixteenth of the compute-bound batch a proposal costs
    # 1/16 of a step, and 1/2 ** 4 of one holds
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 16)) == 4
    # half the proposals expected to hold, against a quarter of a step's cost each
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 4)) == 2
    assert decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH) == []
    for _ in range(6):
        decoder.record(looping, 5, 5)
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 2)) == 5  # they keep being accepted
    for _ in range(20):
        decoder.record(looping, 5, 0)
    # they keep failing (alpha ~0.17): none at a quarter of the batch, one at a sixteenth
    assert decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 4) == []
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 16)) == 1


def test_over_pipeline_stages_the_adaptive_rule_counts_one_steps_share():
    """With two micro batches in flight a step computes half the running requests: as many as the
    compute-bound batch are a step of half of it, where a proposal still pays (1/2 ** 1 >= 1/2);
    without, the step is compute-bound and none is made."""
    for micro_batches, proposals in ((1, 0), (2, 1)):
        s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 1024, speculative=SPEC, micro_batches=micro_batches)
        for i in range(COMPUTE_BOUND_BATCH):
            s.add_request(Request(f"r{i}", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
        first, *_ = (s.schedule() for _ in range(micro_batches))  # the prompts, a micro batch's share per step
        ids = list(first.num_scheduled_tokens)
        s.update(first, StepResult(first.step_id, ids, [5] * len(ids)))
        plan = s.schedule()
        assert len(s.running) == COMPUTE_BOUND_BATCH and len(plan.cached_requests) == len(ids)
        assert [len(plan.spec_token_ids.get(r, ())) for r in ids] == [proposals] * len(ids)


def test_proposals_leave_a_step_within_the_one_call_cpu_steps_size():
    """Requests whose proposals keep being accepted propose until the step holds STEP_TOKENS
    tokens (decodes first): past it a CPU step would leave its one C call."""
    n = COMPUTE_BOUND_BATCH // 2
    s = Scheduler(SchedulerConfig(max_num_seqs=n), CacheConfig(block_size=4), 2048, speculative=SPEC)
    for i in range(n):
        s.add_request(Request(f"r{i}", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
    first = s.schedule()
    ids = list(first.num_scheduled_tokens)
    s.update(first, StepResult(first.step_id, ids, [5] * n))
    for r in s.running:
        r.spec_acceptance = (50.0, 50.0)  # every earlier proposal accepted
    plan = s.schedule()
    proposed = [len(plan.spec_token_ids.get(r, ())) for r in ids]
    assert sum(plan.num_scheduled_tokens.values()) == n + sum(proposed) == STEP_TOKENS
    assert proposed[0] == SPEC.num_speculative_tokens and proposed[-1] == 0  # the first scheduled took the room


class GrammarBreaker:
    """An engine proposer whose proposals are the plain run's next token, then two tokens the
    grammar forbids."""

    def __init__(self, plain: list[int], forbidden: int):
        self.plain, self.forbidden = plain, forbidden

    def propose_for(self, request: Request, k: int) -> list[int]:
        n = request.num_output_tokens
        return [self.plain[n], self.forbidden, self.forbidden][:k] if n + 1 < len(self.plain) else []

    def release(self, request: Request) -> None:
        """Nothing kept."""


def test_proposals_a_grammar_forbids_are_not_verified(runner):
    """The worker cuts the engine's proposals at the first token the request's grammar forbids:
    one verified (and accepted) per step instead of three, the same tokens as without speculation."""
    from shared.processor.tokenizer import load_tokenizer

    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(choice=["yes yes yes yes yes yes yes"]))
    forbidden = load_tokenizer(runner.config.model.path).encode("x", add_special_tokens=False)[0]
    outputs = []
    for spec in (None, SPEC):
        runner.reset()
        engine = EngineCore(dataclasses.replace(runner.config, speculative=spec), runner, 128)
        if spec is not None:
            engine.scheduler.spec.proposer = GrammarBreaker(outputs[0]["c"]["tokens"], forbidden)
        engine.add_request(engine.make_request("c", [7, 8, 9, 10], params))
        outputs.append(collect_outputs(engine))
    assert_same_outputs(outputs[1], outputs[0])
    counts = engine.scheduler.spec
    assert counts.num_drafts > 3 and counts.num_draft_tokens == counts.num_accepted_tokens == counts.num_drafts


def test_bad_proposals_in_a_plan_fail_their_request_alone():
    import numpy as np

    from services.worker.request_checks import WorkerLimits
    from services.worker.request_table import RequestTable
    from shared.protocol import NewRequestData, StepPlan

    table = RequestTable(WorkerLimits(vocab_size=100, num_blocks=8, block_size=4, max_model_len=64))
    ids = np.array([1, 2, 3], dtype=np.int32)
    for r in ("ok", "out-of-vocab", "mid-prompt"):
        computed = 0 if r == "mid-prompt" else 2
        table.apply(StepPlan(0, [NewRequestData(r, ids, ids[:0], SamplingParams(), [0], [0, 1], computed)], [], {}, []))
    proposals = {"ok": [4, 5], "out-of-vocab": [4, 100], "mid-prompt": [4]}
    plan = StepPlan(1, [], [], {r: 1 + len(p) for r, p in proposals.items()}, [],
                    {r: np.array(p, dtype=np.int32) for r, p in proposals.items()})
    assert [s.req_id for s, _ in table.runnable(plan)] == ["ok"]
    assert "token ids in [0, 100)" in table.failed["out-of-vocab"]
    assert "must follow the last token" in table.failed["mid-prompt"]
    with pytest.raises(ValueError, match="needs its tokens and one more scheduled"):
        StepPlan(2, [], [], {"ok": 2}, [], {"ok": np.array([4, 5], dtype=np.int32)})


def test_llm_speculative_config_keeps_texts_with_n_and_stop_strings(model_dirs):
    from pagedserve import LLM

    path = str(model_dirs("llama", attention_scale=0.005))
    llms = [LLM(path, max_model_len=160, kv_cache_memory=8 << 20, speculative_config=c)
            for c in (None, {"method": "ngram", "num_speculative_tokens": 4}, {"method": "suffix"})]
    prompts = ["the cat sat on the mat, the cat sat on the mat", "hello"]
    params = SamplingParams(temperature=0, max_tokens=48, n=2, ignore_eos=True)
    plain, *specs = (llm.generate(prompts, params, use_tqdm=False) for llm in llms)
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a string the output reaches mid-way
    stopped = msgspec.structs.replace(params, stop=[stop])
    plain_stop, *specs_stop = (llm.generate(prompts, stopped, use_tqdm=False) for llm in llms)
    for a, b in [(plain, spec) for spec in specs] + [(plain_stop, spec) for spec in specs_stop]:
        got = [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in b]
        assert got == [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in a]
    for llm, spec_stop in zip(llms[1:], specs_stop):
        assert spec_stop[0].outputs[0].finish_reason == "stop" and stop not in spec_stop[0].outputs[0].text
        assert llm.engine.scheduler.spec.num_accepted_tokens > 0
