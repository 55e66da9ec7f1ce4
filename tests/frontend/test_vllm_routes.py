"""vLLM's other paths to the same endpoints, on a real frontend: /ping is /health, /score and
/rerank, /v2/rerank reach /v1/score and /v1/rerank (keyed and counted as them), the SDK's
models.retrieve reads one card of /v1/models, /load counts the requests being served; vLLM's
server flags --enable-force-include-usage,
--enable-request-id-headers and --exclude-tools-when-tool-choice-none."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from e2e_stack import Stack, paused
from frontend_helpers import metric_value, wait_until

from pagedserve.serve import free_port

KEY = "routes-key"


def _responses(base: str, endpoint: str, status: str) -> float:
    page = httpx.get(f"{base}/metrics", timeout=10).text
    return metric_value(page, "pagedserve_frontend_http_responses_total", endpoint=endpoint, status=status)


def test_ping_and_one_model_card(frontend, client, model):
    before = _responses(frontend, "/health", "200")
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{frontend}/ping", timeout=10).status_code == 200
    assert _responses(frontend, "/health", "200") == before + 2
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


@pytest.fixture(scope="module")
def flagged(stack: Stack) -> str:
    port = free_port()
    proc = stack.start_frontend("fe-vllm-flags", "--enable-force-include-usage", "--enable-request-id-headers",
                                "--exclude-tools-when-tool-choice-none", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


def _last_chunk(base: str, path: str, body: dict) -> dict:
    with httpx.stream("POST", base + path, json=body | {"stream": True, "max_tokens": 3}, timeout=60) as resp:
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return json.loads(data[-2])


def test_force_include_usage_ends_every_stream_with_usage(flagged, frontend, model):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        last = _last_chunk(flagged, path, {"model": model, "ignore_eos": True} | body)
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3, last
        assert "usage" not in _last_chunk(frontend, path, {"model": model} | body)  # not asked, not forced


def test_request_id_headers(flagged, frontend):
    mine = httpx.get(f"{flagged}/v1/models", headers={"X-Request-Id": "trace-42"}, timeout=10)
    assert mine.headers["x-request-id"] == "trace-42"
    fresh = httpx.get(f"{flagged}/v1/models", timeout=10).headers["x-request-id"]
    long = httpx.get(f"{flagged}/v1/models", headers={"X-Request-Id": "x" * 300}, timeout=10).headers["x-request-id"]
    assert len(fresh) == len(long) == 32 and fresh != long
    assert "x-request-id" not in httpx.get(f"{frontend}/v1/models", timeout=10).headers  # off by default


def test_tools_are_kept_from_the_template_when_tool_choice_is_none(flagged, frontend, model):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ask = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    def prompt_tokens(base: str, body: dict) -> int:
        resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens"]

    plain = prompt_tokens(flagged, ask)
    assert prompt_tokens(frontend, ask | {"tools": tools, "tool_choice": "none"}) > plain  # the template shows them
    assert prompt_tokens(flagged, ask | {"tools": tools, "tool_choice": "none"}) == plain


def test_load_counts_the_requests_being_served(frontend, model, backend: Stack):
    def load_becomes(value: int) -> None:
        deadline = time.monotonic() + 30
        while httpx.get(f"{frontend}/load", timeout=10).json() != {"server_load": value}:
            assert time.monotonic() < deadline, f"/load never became {value}"
            time.sleep(0.02)

    load_becomes(0)
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    with paused(backend.procs[0]):  # the worker: the request cannot finish meanwhile
        asked = threading.Thread(target=httpx.post, args=(f"{frontend}/v1/completions",), kwargs={"json": body,
                                                                                                   "timeout": 60})
        asked.start()
        load_becomes(1)
    asked.join(60)
    load_becomes(0)
