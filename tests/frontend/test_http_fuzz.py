"""Schemathesis against a real frontend's /openapi.json: a bounded number of valid and invalid
requests per endpoint, none answered 5xx, and the frontend still healthy afterwards. The stack
runs with a short context and small caps so that whatever is generated finishes quickly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from e2e_stack import Stack
from frontend_helpers import wait_until
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

pytestmark = pytest.mark.timeout(300)

EXAMPLES_PER_ENDPOINT = 25
ENGINE_FLAGS = ("--max-model-len", "48", "--kv-cache-memory", str(16 << 20))
ENDPOINTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
             ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/health"), ("GET", "/version"),
             ("GET", "/metrics"), ("GET", "/load"), ("GET", "/v1/models/{model}"), ("POST", "/v1/responses"),
             ("GET", "/v1/responses/{response_id}"),
             ("DELETE", "/v1/responses/{response_id}"), ("GET", "/v1/responses/{response_id}/input_items"),
             ("POST", "/v1/responses/{response_id}/cancel"), ("POST", "/v1/embeddings"), ("POST", "/v1/score"),
             ("POST", "/v1/classify"),
             ("POST", "/v1/rerank"), ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")]
FRONTEND_FLAGS = ("--max-n", "2", "--max-prompts-per-request", "2", "--max-request-body-bytes", str(1 << 20))


@pytest.fixture(scope="module")
def fuzzed(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    st = Stack(model_path, tmp_path_factory.mktemp("fuzz-logs"), engine_flags=ENGINE_FLAGS)
    try:
        st.start_worker()
        st.start_engine()
        proc = st.start_frontend("fe-fuzz", *FRONTEND_FLAGS)
        wait_until(f"{st.base}/health", proc, timeout=120)
        yield st.base
    finally:
        st.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed: str):
    return schemathesis.openapi.from_url(f"{fuzzed}/openapi.json")


def test_the_schema_lists_every_endpoint(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(ENDPOINTS)


# invalid bodies or query strings for the endpoints that take one (a bare path has no invalid form)
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in ENDPOINTS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in ENDPOINTS
    if (m == "POST" and not p.endswith("/cancel")) or p.endswith(("/input_items", "{response_id}")) and m == "GET"]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda v: getattr(v, "value", v))
def test_no_generated_request_gets_a_server_error(api_schema, fuzzed, method, path, mode):
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(case=strategy)
    def no_server_error(case) -> None:
        resp = case.call(base_url=fuzzed, timeout=60)
        assert resp.status_code < 500, f"{method} {path} {case.body!r} -> {resp.status_code} {resp.text[:500]}"

    no_server_error()


def test_the_frontend_is_healthy_after_the_fuzzing(fuzzed):
    assert httpx.get(f"{fuzzed}/health", timeout=30).status_code == 200
    out = httpx.post(f"{fuzzed}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
