"""Speculative decoding over several ranks (offline LLM, gloo on CPU): ngram, suffix and
draft_model under tensor parallelism (TP=2), pipeline parallelism (PP=2) and both give every kind
of request of test_spec_decode.py (greedy, seeded, logprobs, penalties, min_tokens, a grammar,
prompt logprobs, prefix-cache hits) the outputs of one rank without speculation, with proposals
both accepted and rejected, `max_tokens` exact and every block back in the pool. The draft model
is sharded like the target over the TP ranks (each counts its share of the draft's KV) and runs
whole on the last pipeline stage. Combinations that cannot run are refused at startup."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from engine_outputs import assert_same_outputs
from test_spec_decode import PARAMS, run_requests
from test_spec_decode_draft import draft, target  # noqa: F401  (module fixtures)

from pagedserve import LLM
from shared.config import EngineConfig, ModelConfig, ParallelConfig
from shared.draft_model import draft_model_config
from shared.speculative import SpeculativeConfig

K = 4
MEMORY = 8 << 20
SETUP = {"max_model_len": 160, "kv_cache_memory": MEMORY, "block_size": 8, "max_num_batched_tokens": 48}
CASES = {  # name: (tensor_parallel_size, pipeline_parallel_size, method)
    "tp2-ngram": (2, 1, "ngram"),
    "tp2-draft_model": (2, 1, "draft_model"),
    "pp2-suffix": (1, 2, "suffix"),
    "pp2-draft_model": (1, 2, "draft_model"),
    "tp2xpp2-ngram": (2, 2, "ngram"),
}


def spec_config(method: str, draft_dir: str) -> dict:
    if method == "draft_model":  # draft_cost 0: it drafts whenever proposals hold
        return {"method": method, "model": draft_dir, "num_speculative_tokens": K, "draft_cost": 0}
    if method == "ngram":
        return {"method": method, "num_speculative_tokens": K, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    return {"method": method, "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def one_rank(target) -> dict:  # noqa: F811
    """One rank without speculation."""
    llm = LLM(target, **SETUP)
    return run_requests(llm.engine, llm.runner.num_blocks, copies=1)


@pytest.mark.parametrize(("tp", "pp", "method"), list(CASES.values()), ids=list(CASES))
def test_speculation_over_ranks_gives_one_ranks_outputs(target, draft, one_rank, tp, pp, method):  # noqa: F811
    with LLM(target, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             speculative_config=spec_config(method, draft), **SETUP) as llm:
        got = run_requests(llm.engine, llm.runner.num_blocks, copies=1)
        counts, num_blocks = llm.engine.scheduler.spec, llm.runner.num_blocks
    assert_same_outputs(got, one_rank)
    for name, params in PARAMS.items():
        if params.ignore_eos:
            assert len(got[f"{name}-0"]["tokens"]) == params.max_tokens, name
    assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens  # some accepted, some rejected
    if method == "draft_model":
        assert num_blocks == expected_num_blocks(target, draft, tp, pp)


def expected_num_blocks(target: str, draft_dir: str, tp: int, pp: int) -> int:
    """The KV blocks of the tightest rank, the last stage's first: the budget less the draft's
    scratch blocks, over its share of a target block and of a draft block (float32)."""
    model = ModelConfig.from_pretrained(target, max_model_len=SETUP["max_model_len"])
    draft_model = draft_model_config(EngineConfig(model, speculative=SpeculativeConfig.parse(
        spec_config("draft_model", draft_dir))))

    def block_bytes(m: ModelConfig, stages: int) -> int:
        kv_heads = max(1, m.num_kv_heads // tp)
        return 2 * (m.num_layers // stages) * SETUP["block_size"] * kv_heads * m.head_dim * 4

    scratch = 128 * (-(-K // SETUP["block_size"]) + 1) * block_bytes(draft_model, 1)  # max_num_seqs rows
    return (MEMORY - scratch) // (block_bytes(model, pp) + block_bytes(draft_model, 1))


def test_draft_model_parallel_combinations_that_cannot_run_are_refused(target, draft, tmp_path):  # noqa: F811
    model = ModelConfig.from_pretrained(target, max_model_len=SETUP["max_model_len"])
    tp2 = ParallelConfig(tensor_parallel_size=2)
    replicated = SpeculativeConfig.parse({**spec_config("draft_model", draft), "draft_tensor_parallel_size": 1})
    with pytest.raises(ValueError, match=r"draft_tensor_parallel_size must equal tensor_parallel_size \(2\)"):
        EngineConfig(model, parallel=tp2, speculative=replicated)
    odd = shutil.copytree(draft, tmp_path / "three-kv-heads")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3, "num_attention_heads": 6}))
    with pytest.raises(ValueError, match="6 attention heads and 3 KV heads, which tensor_parallel_size 2 cannot"):
        EngineConfig(model, parallel=tp2, speculative=SpeculativeConfig.parse(spec_config("draft_model", str(odd))))
    sharded = dataclasses.replace(replicated, draft_tensor_parallel_size=2)
    assert EngineConfig(model, parallel=tp2, speculative=sharded).speculative.draft_tensor_parallel_size == 2
