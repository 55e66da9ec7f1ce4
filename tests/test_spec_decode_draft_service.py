"""Speculative decoding with a draft model through the engine and worker processes: the checks of
test_spec_decode_service.py (greedy output equal to the offline non-speculative run, vLLM's
spec_decode counters, a killed worker replaced mid-request and the request resumed token for
token: the new worker rebuilds the draft's KV from the resent tokens), run on a stack whose
worker drafts with the first 2 layers of a 4-layer target."""

from __future__ import annotations

import json

import pytest
from test_engine_service import engine_stack
from test_spec_decode_service import (  # noqa: F401 -- the same tests and fixture, on this module's stack
    expected,
    test_a_killed_worker_is_replaced_and_the_request_resumes_token_for_token,
    test_served_greedy_output_equals_non_speculative_and_is_counted,
)


@pytest.fixture(scope="module")
def model(model_dirs) -> str:
    return str(model_dirs("llama", attention_scale=0.005, config_overrides={"num_hidden_layers": 4}))


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    from pagedserve.test_draft_model import make_draft_model

    draft = make_draft_model(model, tmp_path_factory.mktemp("draft"), 2)
    spec = ("--speculative-config", json.dumps({"method": "draft_model", "model": str(draft),
                                                "num_speculative_tokens": 4, "draft_cost": 0}))
    with engine_stack(model, *spec, "--worker-timeout", "5", worker_flags=spec) as started:
        yield started
