"""Speculative decoding over several ranks (offline LLM, gloo on CPU): every kind of request of
test_spec_decode.py (greedy, seeded, logprobs, penalties, min_tokens, a grammar, prompt logprobs)
gets the outputs of one rank without speculation, with `max_tokens` exact and every block back in
the pool. ngram over two tensor-parallel ranks, and over two pipeline stages with preemption,
chunked prefill and prefix-cache hits, has proposals both accepted and rejected (rolled back on
every stage). draft_model, sharded like the target over the TP ranks and whole on the last
pipeline stage, with a draft equal to the target has every proposal accepted: its sharded weights
and KV are right, and the ranks drafted alike; so does a draft whole on each TP rank
(draft_tensor_parallel_size 1). Each rank counts its share of the draft's KV in its budget.
Combinations that cannot run are refused at startup."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_outputs import assert_same_outputs, collect_outputs
from test_spec_decode import PARAMS, GrammarBreaker, run_requests

from pagedserve import LLM
from shared.config import EngineConfig, ModelConfig, ParallelConfig
from shared.processor.tokenizer import load_tokenizer
from shared.sampling_params import SamplingParams, StructuredOutputsParams
from shared.speculative import SpeculativeConfig

K = 4
MEMORY = 8 << 20
SETUP = {"max_model_len": 160, "kv_cache_memory": MEMORY, "block_size": 8, "max_num_batched_tokens": 48}
# a pool that preempts, prompts chunked, each prompt twice (the second hits the prefix cache)
PREEMPTING = {**SETUP, "num_gpu_blocks_override": 24, "max_num_batched_tokens": 20}
CASES = {  # name: (tensor_parallel_size, pipeline_parallel_size, method, draft_tensor_parallel_size, preempting)
    "tp2-draft_model": (2, 1, "draft_model", None, False),
    "tp2-draft_model-whole": (2, 1, "draft_model", 1, False),
    "pp2-draft_model": (1, 2, "draft_model", None, False),
    "tp2-ngram": (2, 1, "ngram", None, False),
    "pp2-ngram-preempting": (1, 2, "ngram", None, True),
}


def spec_config(method: str, draft_dir: str, draft_tp: int | None = None) -> dict:
    if method == "draft_model":  # draft_cost 0: it drafts whenever proposals hold
        return {"method": method, "model": draft_dir, "num_speculative_tokens": K, "draft_cost": 0,
                "draft_tensor_parallel_size": draft_tp}
    return {"method": method, "num_speculative_tokens": K, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def target(model_dirs) -> str:
    """test_spec_decode_draft.py's target (the same checkpoint, built once per session)."""
    return str(model_dirs("llama", attention_scale=0.005, config_overrides={"num_hidden_layers": 4}))


def generate(llm: LLM, preempting: bool) -> dict:
    return run_requests(llm.engine, llm.runner.num_blocks, copies=2 if preempting else 1)


@pytest.fixture(scope="module")
def one_rank(target):
    """One rank's outputs without speculation, by setup (made once each)."""
    runs: dict[bool, dict] = {}

    def get(preempting: bool) -> dict:
        if preempting not in runs:
            runs[preempting] = generate(LLM(target, **(PREEMPTING if preempting else SETUP)), preempting)
        return runs[preempting]

    return get


@pytest.mark.parametrize(("tp", "pp", "method", "draft_tp", "preempting"), list(CASES.values()), ids=list(CASES))
def test_speculation_over_ranks_gives_one_ranks_outputs(target, one_rank, tp, pp, method, draft_tp, preempting):
    expected = one_rank(preempting)
    twin = method == "draft_model"  # the draft is the target itself (its drafts cut where a grammar forbids them)
    with LLM(target, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             speculative_config=spec_config(method, target, draft_tp), **(PREEMPTING if preempting else SETUP)) as llm:
        got = generate(llm, preempting)
        counts, num_blocks = llm.engine.scheduler.spec, llm.runner.num_blocks
        assert llm.engine.scheduler.num_preemptions > 0 or not preempting
    assert_same_outputs(got, expected)
    for name, params in PARAMS.items():
        if params.ignore_eos:
            assert len(got[f"{name}-0"]["tokens"]) == params.max_tokens, name
    if twin:
        assert counts.num_draft_tokens > 20 and counts.num_accepted_tokens == counts.num_draft_tokens
        assert num_blocks == expected_num_blocks(target, tp, pp, draft_tp or tp)
    else:
        assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens  # some accepted, some rejected


def test_proposals_a_grammar_forbids_are_cut_on_every_stage(target, one_rank):
    """Over two pipeline stages the earlier stage's grammar matchers follow each step's outcome, so
    every stage cuts the engine's proposals where the request's grammar forbids them, as one rank
    does: one proposal verified (and accepted) per step instead of three, the tokens of a run
    without speculation. Uncut, the earlier stage would run a step of other token counts."""
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(choice=["yes yes yes yes yes yes yes"]))
    forbidden = load_tokenizer(target).encode("x", add_special_tokens=False)[0]
    outputs = []
    for pp in (1, 2):
        spec = None if pp == 1 else spec_config("ngram", target)
        with LLM(target, pipeline_parallel_size=pp, speculative_config=spec, **SETUP) as llm:
            if spec is not None:
                llm.engine.scheduler.spec.proposer = GrammarBreaker(outputs[0]["c"]["tokens"], forbidden)
            llm.engine.add_request(llm.engine.make_request("c", [7, 8, 9, 10], params))
            outputs.append(collect_outputs(llm.engine))
            counts = llm.engine.scheduler.spec
    assert_same_outputs(outputs[1], outputs[0])
    assert counts.num_drafts > 3 and counts.num_draft_tokens == counts.num_accepted_tokens == counts.num_drafts


def expected_num_blocks(target: str, tp: int, pp: int, draft_tp: int) -> int:
    """The KV blocks of the tightest rank (the last stage's, beside the draft with all its layers):
    the budget less the draft's scratch blocks, over its share of a target block and of a draft
    block (float32; the draft is the target, over draft_tp ranks)."""
    model = ModelConfig.from_pretrained(target, max_model_len=SETUP["max_model_len"])

    def block_bytes(stages: int, ranks: int) -> int:
        kv_heads = max(1, model.num_kv_heads // ranks)
        return 2 * (model.num_layers // stages) * SETUP["block_size"] * kv_heads * model.head_dim * 4

    scratch = 128 * (-(-K // SETUP["block_size"]) + 1) * block_bytes(1, draft_tp)  # max_num_seqs rows
    return (MEMORY - scratch) // (block_bytes(pp, tp) + block_bytes(1, draft_tp))


def test_draft_model_parallel_combinations_are_checked_at_startup(target, tmp_path):
    model = ModelConfig.from_pretrained(target, max_model_len=SETUP["max_model_len"])
    tp2 = ParallelConfig(tensor_parallel_size=2)
    four = SpeculativeConfig.parse(spec_config("draft_model", target, 4))
    with pytest.raises(ValueError, match=r"draft_tensor_parallel_size must be 1 .* or tensor_parallel_size \(2\), got 4"):
        EngineConfig(model, parallel=tp2, speculative=four)
    odd = shutil.copytree(target, tmp_path / "three-kv-heads")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3, "num_attention_heads": 6}))
    with pytest.raises(ValueError, match="6 attention heads and 3 KV heads, which tensor_parallel_size 2 cannot"):
        EngineConfig(model, parallel=tp2, speculative=SpeculativeConfig.parse(spec_config("draft_model", str(odd))))
    for draft_tp in (1, 2):  # whole on every rank: any heads; sharded: the target's size
        spec = SpeculativeConfig.parse(spec_config("draft_model", str(odd) if draft_tp == 1 else target, draft_tp))
        assert EngineConfig(model, parallel=tp2, speculative=spec).speculative.draft_tensor_parallel_size == draft_tp
