"""vLLM's other paths to the same endpoints, on a real frontend: /ping is /health, /score and
/rerank, /v2/rerank reach /v1/score and /v1/rerank (keyed and counted as them), and the SDK's
models.retrieve reads one card of /v1/models."""

from __future__ import annotations

import httpx
import openai
import pytest
from e2e_stack import Stack
from frontend_helpers import metric_value, wait_until

KEY = "routes-key"


def _responses(base: str, endpoint: str, status: str) -> float:
    page = httpx.get(f"{base}/metrics", timeout=10).text
    return metric_value(page, "pagedserve_frontend_http_responses_total", endpoint=endpoint, status=status)


def test_ping_and_one_model_card(frontend, client, model):
    before = _responses(frontend, "/health", "200")
    assert httpx.get(f"{frontend}/ping", timeout=10).status_code == 200
    assert _responses(frontend, "/health", "200") == before + 1
    assert client.models.retrieve(model).model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(("endpoint", "aliases", "body"), [
    ("/v1/score", ("/score",), {"text_1": "a", "text_2": "b"}),
    ("/v1/rerank", ("/rerank", "/v2/rerank"), {"query": "a", "documents": ["b"]}),
])
def test_aliases_are_their_endpoint(frontend, model, endpoint, aliases, body):
    before = _responses(frontend, endpoint, "400")
    answers = [httpx.post(frontend + path, json={"model": model, **body}, timeout=30) for path in (endpoint, *aliases)]
    # a generating model: the endpoint's own 400, word for word, whichever path asked
    assert {a.status_code for a in answers} == {400} and len({a.text for a in answers}) == 1, answers[0].text
    assert _responses(frontend, endpoint, "400") == before + len(answers)


def test_aliases_want_the_key(stack: Stack, tmp_path_factory: pytest.TempPathFactory, model):
    keyed = stack.sharing(tmp_path_factory.mktemp("routes-logs"), api_key=KEY)
    try:
        wait_until(f"{keyed.base}/health", keyed.start_frontend("fe-routes"), timeout=120)
        for path in ("/score", "/rerank", "/v2/rerank"):
            assert httpx.post(keyed.base + path, json={"model": model}, timeout=10).status_code == 401, path
            with_key = httpx.post(keyed.base + path, json={"model": model}, timeout=10,
                                  headers={"Authorization": f"Bearer {KEY}"})
            assert with_key.status_code == 400, path
        assert httpx.get(f"{keyed.base}/ping", timeout=10).status_code == 200  # like /health: no key
    finally:
        keyed.close()
