"""What the served speculative-decoding tests share: their prompts and greedy parameters, and the
module-scoped fixtures `model` (a checkpoint whose greedy output loops, so proposals get accepted)
and `expected` (its offline non-speculative greedy outputs of PROMPTS), made for each test module
by `module_fixtures()` (a fixture imported from another test module would be redefined by the
tests that take it)."""

from __future__ import annotations

import pytest

from shared.sampling_params import SamplingParams

PROMPTS = [[11, 12, 13], list(range(20, 60)), [99] * 17]
GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


def greedy_outputs(model: str) -> list[list[int]]:
    """PROMPTS' GREEDY token ids, offline and without speculation."""
    from pagedserve import LLM

    llm = LLM(model, max_model_len=128, kv_cache_memory=8 << 20)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def module_fixtures():
    """The `model` and `expected` fixtures, for a test module to bind at its top level."""

    @pytest.fixture(scope="module")
    def model(model_dirs) -> str:
        return str(model_dirs("llama", attention_scale=0.005))  # greedy output loops: proposals get accepted

    @pytest.fixture(scope="module")
    def expected(model) -> list[list[int]]:
        return greedy_outputs(model)

    return model, expected
