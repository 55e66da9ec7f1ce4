"""Speculative decoding (ngram, suffix) over the real model runner, in one process: every kind of
request ends with the tokens, logprobs and finish reasons of non-speculative decoding, also with
chunked prefill, prefix caching and a tiny KV pool that preempts; proposals are both accepted and
rejected, blocks of rejected tokens go back to the pool at once, and none is left behind. Sampled
requests keep their distribution, and proposals a grammar forbids are not verified. The scheduler's
side without a model is in test_spec_decode_scheduler.py.

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
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
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
