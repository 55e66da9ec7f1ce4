"""Speculative decoding with an EAGLE head through the engine and worker processes: the checks of
test_spec_decode_service.py (greedy output equal to the offline non-speculative run, vLLM's
spec_decode counters with proposals both accepted and rejected, every block back; a killed worker
replaced mid-request and the request resumed token for token: the new worker's head rebuilds its
KV from the target's recomputation of the resent tokens). The target is a one-layer tiny llama
whose final norm weight is one, the head computes its layer one position later
(pagedserve/test_eagle.py kind "mimic")."""

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
def model(model_dirs, tmp_path_factory) -> str:
    from pagedserve.test_eagle import with_unit_final_norm

    one_layer = model_dirs("llama", config_overrides={"num_hidden_layers": 1})
    return str(with_unit_final_norm(one_layer, tmp_path_factory.mktemp("unit-norm")))


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    from pagedserve.test_eagle import make_eagle_head

    head = make_eagle_head(model, tmp_path_factory.mktemp("eagle"), "eagle", "mimic")
    spec = ("--speculative-config", json.dumps({"method": "eagle", "model": str(head),
                                                "num_speculative_tokens": 3, "draft_cost": 0}))
    with engine_stack(model, *spec, "--worker-timeout", "5", worker_flags=spec) as started:
        yield started
