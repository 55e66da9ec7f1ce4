"""Speculative decoding with a draft model (method draft_model) over the real model runner, in one
process. The target is a 4-layer tiny llama whose greedy output loops (see test_spec_decode.py);
the draft is its first 2 layers (same vocabulary and head), so proposals are both accepted and
rejected. Every kind of request ends with the outputs of non-speculative decoding, with chunked
prefill, prefix caching and a pool small enough to preempt. A draft identical to the target has
every proposal accepted, greedy, seeded and (by rejection sampling, q = p) unseeded alike: so its
paged KV is right after prefix-cache hits, preemption, rejected proposals and positions past the
request's blocks, and its q is processed as the target's p. Rejection sampling itself is checked
statistically on a 6-token vocabulary."""

from __future__ import annotations

import dataclasses
from collections import Counter

import msgspec
import pytest
from engine_outputs import assert_same_outputs, collect_outputs
from test_spec_decode import SAMPLED, generate, homogeneous

from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

SETUPS = {"roomy": (128, 48), "preempting": (24, 20)}  # (KV blocks, token budget per step)


@pytest.fixture(scope="module")
def target(model_dirs) -> str:
    return str(model_dirs("llama", attention_scale=0.005, config_overrides={"num_hidden_layers": 4}))


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory) -> str:
    from pagedserve.test_draft_model import make_draft_model

    return str(make_draft_model(target, tmp_path_factory.mktemp("draft"), 2))


def draft_spec(model: str, k: int = 4, cost: float | None = 0.0) -> SpeculativeConfig:
    """cost 0: drafting is taken as free, so the tests of the draft's mechanism (its KV, its q)
    draft whenever proposals hold (a draft equal to the target would never pay)."""
    return SpeculativeConfig(method="draft_model", model=model, num_speculative_tokens=k, draft_cost=cost)


def make_runner(target: str, spec: SpeculativeConfig | None, kv_cache_memory: int = 8 << 20,
                scheduler: SchedulerConfig | None = None):
    from services.worker.model_runner import ModelRunner

    model = ModelConfig.from_pretrained(target, max_model_len=160)
    cache = CacheConfig(kv_cache_memory=kv_cache_memory, block_size=8)
    return ModelRunner(EngineConfig(model, cache, scheduler or SchedulerConfig(), speculative=spec))


@pytest.fixture(scope="module")
def plain(target):
    """Non-speculative outputs per setup, from a runner with no draft."""
    runner = make_runner(target, None)
    return {name: generate(runner, None, *setup)[0] for name, setup in SETUPS.items()}


@pytest.fixture(scope="module")
def draft_runner(target, draft):
    return make_runner(target, draft_spec(draft))


def test_draft_model_speculation_gives_the_same_outputs(draft_runner, draft, plain):
    spec, engine = generate(draft_runner, draft_spec(draft), *SETUPS["roomy"])
    assert_same_outputs(spec, plain["roomy"])
    counts = engine.scheduler.spec
    assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens  # some accepted, some rejected


@pytest.fixture(scope="module")
def twin_runner(target):
    """A runner whose draft is the target itself."""
    return make_runner(target, draft_spec(target))


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(twin_runner, target, plain):
    """With preemption, chunked prefill and prefix-cache hits (the draft's KV of a cached block
    must be valid too), and drafts past the request's blocks. The draft ignores the "choice"
    request's grammar, so its proposals run into tokens the grammar forbids: they are cut there,
    and every proposal verified is the target's constrained choice too."""
    runner = twin_runner
    spec, engine = generate(runner, draft_spec(target), *SETUPS["preempting"])
    assert_same_outputs(spec, plain["preempting"])
    counts = engine.scheduler.spec
    assert counts.num_draft_tokens > 100 and counts.num_accepted_tokens == counts.num_draft_tokens
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.kv.prefix_hit_tokens > 0


def test_rejection_sampling_accepts_every_draft_when_q_equals_p(twin_runner, target):
    """Unseeded sampling with top-p, min-p, penalties and logit bias: a draft equal to the target
    has q = p at every position, so rejection sampling keeps every draft (an exact match would
    keep about sum p^2 of them): the draft's q is processed exactly as the target's p."""
    runner = twin_runner
    runner.reset()
    params = msgspec.structs.replace(SAMPLED["top-p-min-p-penalties-bias"], max_tokens=16)
    engine = EngineCore(dataclasses.replace(runner.config, speculative=draft_spec(target)), runner, 64)
    for i in range(4):
        engine.add_request(engine.make_request(f"r{i}", [17, 256, 3, 98, i + 5], params))
    out = collect_outputs(engine)
    assert all(len(o["tokens"]) == 16 for o in out.values())
    counts = engine.scheduler.spec
    assert counts.num_draft_tokens > 20 and counts.num_accepted_tokens == counts.num_draft_tokens


def test_the_draft_kv_cache_is_counted_in_the_memory_budget(target, draft):
    from services.worker.kv_cache import kv_block_bytes

    memory = 4 << 20  # the pool binds (not max_num_seqs x max_model_len)
    plain, spec = make_runner(target, None, memory), make_runner(target, draft_spec(draft), memory)
    target_bytes = kv_block_bytes(plain.config, plain.kv_dtype)
    draft_bytes = spec.draft.block_bytes
    assert draft_bytes == target_bytes // 2  # 2 of the target's 4 layers, the same heads
    assert plain.num_blocks == memory // target_bytes
    assert spec.num_blocks == (memory - spec.draft.scratch_bytes) // (target_bytes + draft_bytes)
    assert spec.draft.kv_caches[0].shape[1] == spec.num_blocks + spec.draft.num_scratch
    assert len(spec.draft.kv_caches) == spec.draft.config.model.num_layers == 2


def test_draft_model_config_is_checked(target, draft, tmp_path):
    import json
    import shutil

    model = ModelConfig.from_pretrained(target, max_model_len=160)
    other_vocab = shutil.copytree(draft, tmp_path / "other-vocab")
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 2048}))
    for spec, match in (
        ({"method": "draft_model", "num_speculative_tokens": 3}, 'needs a "model"'),
        ({"method": "draft_model", "model": draft, "draft_tensor_parallel_size": 0}, "positive integer"),
        ({"method": "draft_model", "model": draft, "prompt_lookup_max": 3}, "not used by method"),
        ({"method": "ngram", "model": draft}, "not used by method"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(spec)
    for bad, match in ((str(other_vocab), "vocabulary of 2048 tokens, the target 1024"),
                       (str(tmp_path / "missing"), "no config.json|not a directory")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(model, speculative=draft_spec(bad))
    sharded = SpeculativeConfig.parse({"method": "draft_model", "model": draft, "draft_tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"draft_tensor_parallel_size must be 1 .* or tensor_parallel_size \(1\)"):
        EngineConfig(model, speculative=sharded)
    parsed = SpeculativeConfig.parse(json.dumps({"method": "draft_model", "model": draft,
                                                 "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}))
    assert EngineConfig(model, speculative=parsed).speculative.model == draft


def test_llm_draft_model_keeps_texts_with_n_and_stop_strings(target, draft):
    from pagedserve import LLM

    llms = [LLM(target, max_model_len=160, kv_cache_memory=8 << 20, speculative_config=c)
            for c in (None, {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, "draft_cost": 0})]
    prompts = ["the cat sat on the mat, the cat sat on the mat", "hello"]
    params = SamplingParams(temperature=0, max_tokens=24, n=2, ignore_eos=True)
    plain = llms[0].generate(prompts, params, use_tqdm=False)
    text = plain[0].outputs[0].text
    stopped = msgspec.structs.replace(params, stop=[text[len(text) // 2 : len(text) // 2 + 2]])
    for p in (params, stopped):
        a, b = (llm.generate(prompts, p, use_tqdm=False) for llm in llms)
        got = [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in b]
        assert got == [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in a]
    assert llms[1].engine.scheduler.spec.num_accepted_tokens > 0


def test_rejection_sampling_keeps_the_target_distribution_and_accepts_by_overlap():
    """Drafts drawn from q, verified against p on a 6-token vocabulary: the tokens are distributed
    as p, and a draft is kept with probability 1 - TV(p, q) (an exact match would keep sum p*q)."""
    import torch

    from services.worker.layers.sampler import SamplingMetadata, SamplingState
    from services.worker.rejection_sampler import DraftDistributions
    from services.worker.request_table import RequestState

    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    q = torch.tensor([0.1, 0.3, 0.3, 0.05, 0.05, 0.2])
    n = 4000
    drafts = torch.multinomial(q, n, replacement=True).tolist()
    params = SamplingParams(temperature=1.0)
    states = [RequestState(f"r{i}", [], 0, SamplingState.create(params, [1], ()), spec_token_ids=[d])
              for i, d in enumerate(drafts)]
    store = DraftDistributions()
    store.latest = {s.req_id: ([d], q[None]) for s, d in zip(states, drafts)}
    logits = p.log().expand(n, -1).clone()
    chosen = store.choose(logits, SamplingMetadata.build([s.sampling for s in states], 6, "cpu"), states, 0).tolist()
    direct = torch.multinomial(p, n, replacement=True).tolist()
    assert homogeneous(Counter(chosen), Counter(direct)), (Counter(chosen), Counter(direct))
    kept = sum(c == d for c, d in zip(chosen, drafts)) / n
    overlap = float(torch.minimum(p, q).sum())  # 1 - TV(p, q) = 0.64 here; sum p*q = 0.176
    assert abs(kept - overlap) < 0.04
    assert store.choose(logits, SamplingMetadata.build([s.sampling for s in states], 6, "cpu"), states, 1) is None


def test_draft_model_with_async_scheduling_accepts_a_twin_draft_and_gives_the_same_outputs(twin_runner, plain):
    """The worker drafts after each step and keeps the drafts for the request's next step, which
    the engine planned before it knew this step's tokens (test_spec_decode_async.py): a draft
    equal to the target has every proposal accepted, with preemption and prefix-cache hits, so
    its KV and the slots the engine reserved are right. (The runner was started without async
    scheduling: it also sends its drafts back, which an engine with it does not use.) The drafts
    of the "choice" request are cut where its grammar forbids them, as in the twin test."""
    from test_spec_decode_async import generate_async

    spec, engine = generate_async(twin_runner, *SETUPS["preempting"])
    assert_same_outputs(spec, plain["preempting"])
    counts = engine.scheduler.spec
    assert counts.num_draft_tokens > 100 and counts.num_accepted_tokens == counts.num_draft_tokens
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.kv.prefix_hit_tokens > 0
