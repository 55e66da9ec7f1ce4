"""The HTTP boundary against a hostile client, through real frontends on a real engine: values no
wire can carry, body size, per-request caps, max_tokens beyond the context, Retry-After on 503,
and a frontend that keeps serving after all of it (the API key: test_http_auth)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from frontend_helpers import GREEDY, REPO, wait_until

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(180)

MAX_MODEL_LEN = 1024  # e2e_stack.ENGINE_FLAGS
KEY = "sekrit"
BODY_CAP = 4096
# behind a path-based proxy (--root-path) the routes stay where they are, and so must the key
TIGHT = ("--api-key", KEY, "--max-request-body-bytes", str(BODY_CAP), "--max-n", "3", "--max-logprobs", "4",
         "--max-prompts-per-request", "2", "--root-path", "/proxied")
HUGE = 1 << 70


@pytest.fixture(scope="module")
def tight(stack) -> str:
    """A frontend with an API key and small caps, on its own port."""
    port = free_port()
    proc = stack.start_frontend("fe-tight", *TIGHT, port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST ``body`` as JSON with ASCII escapes, so lone surrogates travel as a client may send them."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json", **(headers or {})},
                      timeout=60)


def _error(resp: httpx.Response, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"], err
    assert err["param"] == param, err
    return err


COMPLETION_BODIES = [
    ({"max_tokens": HUGE}, "max_tokens"),
    ({"seed": HUGE}, "seed"),
    ({"seed": -HUGE}, "seed"),
    ({"top_k": HUGE}, "top_k"),
    ({"n": HUGE}, "n"),
    ({"min_tokens": HUGE}, "min_tokens"),
    ({"logprobs": HUGE}, "logprobs"),
    ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logit_bias": {str(HUGE): 1}}, "logit_bias"),
    ({"priority": HUGE}, "priority"),
    ({"prompt": [HUGE]}, "prompt"),
    ({"prompt": [[1, -HUGE]]}, "prompt"),
    ({"stop": "\ud800"}, "stop"),
    ({"stop": ["ok", "a\udfff"]}, "stop"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["fine", "x\ud800"]}, "prompt"),
    ({"model": "\ud800"}, "model"),
    ({"user": "\udc00"}, "user"),
    ({"guided_regex": "\ud800"}, "guided_regex"),
    ({"structured_outputs": {"choice": ["a", "\ud800"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "integer", "maximum": HUGE}}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "\ud800", "schema": {}}}},
     "response_format"),
    ({"logit_bias": {"\ud800": 1}}, "logit_bias"),
]


@pytest.mark.parametrize(("extra", "param"), COMPLETION_BODIES)
def test_unwireable_completion_values_get_400_naming_the_field(frontend, extra, param):
    body = {"prompt": "Hello", "max_tokens": 2, **extra}
    _error(_post(f"{frontend}/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages"),
        ({"chat_template_kwargs": {"enable_thinking": "\ud800"}}, "chat_template_kwargs"),
        ({"chat_template": "\ud800"}, "chat_template"),
        ({"max_completion_tokens": HUGE}, "max_completion_tokens"),
        ({"logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
        ({"seed": HUGE}, "seed"),
    ],
)
def test_unwireable_chat_values_get_400_naming_the_field(frontend, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    _error(_post(f"{frontend}/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/detokenize", {"tokens": [HUGE]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ],
)
def test_tokenizer_endpoint_errors_name_the_field(frontend, path, body, param):
    _error(_post(f"{frontend}{path}", body), 400, param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"input": "x", "max_output_tokens": HUGE}, "max_output_tokens"),
        ("/v1/responses", {"input": "\ud800"}, "input"),
        ("/v1/responses", {"input": "x", "tools": [{"type": "function", "name": "\ud800"}]}, "tools"),
        ("/v1/responses", {"input": "x", "previous_response_id": "\ud800"}, "previous_response_id"),
        ("/v1/responses", {"input": [{"type": "message", "role": "user", "content": [1, 2]}]}, "input[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "maxLength": HUGE}}}]},
         "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [],
                                  "tool_choice": {"type": "function", "function": {"name": "\ud800"}}}, "tool_choice"),
    ],
)
def test_hostile_tool_and_responses_values_get_400_naming_the_field(frontend, path, body, param):
    _error(_post(f"{frontend}{path}", body), 400, param)


def test_unparsable_bodies_have_a_code(frontend):
    for content, ctype in ((b"{nope", "application/json"), (b'{"prompt": "x"}', "text/plain"),
                           (b'{"prompt": 1' + b"9" * 5000 + b"}", "application/json"), (b"[1, 2]", "application/json")):
        resp = httpx.post(f"{frontend}/v1/completions", content=content, headers={"content-type": ctype}, timeout=30)
        assert _error(resp, 400, None)["code"] == "invalid_json"


def test_the_frontend_still_serves_after_hostile_values(frontend, greedy):
    """Run after the hostile matrix (file order): nothing above reached the engine link."""
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "priority": 0}
    resp = _post(f"{frontend}/v1/completions", body)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == greedy("Hello", 4)
    assert httpx.get(f"{frontend}/health", timeout=10).status_code == 200


def test_priority_reaches_the_engine(frontend):
    """This engine schedules fcfs, so it refuses a non-zero priority: the field got there."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": 3}
    resp = _post(f"{frontend}/v1/chat/completions", body)
    assert resp.status_code == 400 and "priority" in resp.json()["error"]["message"], resp.text


def test_max_tokens_beyond_the_context_is_400_with_the_arithmetic(frontend, client, model, model_tokenizer):
    n_prompt = len(model_tokenizer.encode("Hello"))
    body = {"prompt": "Hello", "max_tokens": MAX_MODEL_LEN}
    err = _error(_post(f"{frontend}/v1/completions", body), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    assert f"{MAX_MODEL_LEN} tokens" in err["message"] and f"{n_prompt + MAX_MODEL_LEN} tokens" in err["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_MODEL_LEN}
    err = _error(_post(f"{frontend}/v1/chat/completions", body), 400, "max_completion_tokens")
    assert "in the messages" in err["message"]
    # exactly the rest of the context is fine, and unset means the rest of it
    out = client.completions.create(model=model, prompt="Hello", max_tokens=MAX_MODEL_LEN - n_prompt, **GREEDY)
    assert out.usage.completion_tokens == MAX_MODEL_LEN - n_prompt
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert out.usage.prompt_tokens + out.usage.completion_tokens == MAX_MODEL_LEN


def test_body_cap_answers_413_declared_or_streamed(tight):
    auth = {"authorization": f"Bearer {KEY}"}
    big = {"prompt": "x" * BODY_CAP}
    err = _error(_post(f"{tight}/tokenize", big, auth), 413, None)
    assert err["code"] == "request_too_large" and str(BODY_CAP) in err["message"]

    def chunks():  # no Content-Length: counted as it streams in
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * 256
        yield b'"}'

    resp = httpx.post(f"{tight}/tokenize", content=chunks(), headers={**auth, "content-type": "application/json"},
                      timeout=30)
    assert "content-length" not in resp.request.headers
    assert _error(resp, 413, None)["code"] == "request_too_large"
    ok = _post(f"{tight}/tokenize", {"prompt": "x" * (BODY_CAP // 2)}, auth)
    assert ok.status_code == 200 and ok.json()["count"] > 0



def test_messages_api_errors_answered_before_its_routes_keep_anthropics_shape(tight):
    """A wrong key, a body past the cap, a wrong method or path on /v1/messages (under the root
    path too) come in Anthropic's shape, as its routes' own errors do; they had been OpenAI's."""
    def anthropic(resp: httpx.Response, status: int, kind: str) -> str:
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == kind, body
        return body["error"]["message"]

    ask = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    key = {"x-api-key": KEY}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert "x-api-key" in anthropic(_post(f"{tight}{path}", ask, {"x-api-key": "wrong"}), 401, "authentication_error")
        message = anthropic(_post(f"{tight}{path}", {**ask, "system": "x" * BODY_CAP}, key), 413, "request_too_large")
        assert str(BODY_CAP) in message
    anthropic(httpx.get(f"{tight}/v1/messages", headers=key, timeout=10), 405, "invalid_request_error")
    anthropic(_post(f"{tight}/v1/messages/batches", {}, key), 404, "not_found_error")
    # OpenAI's routes keep OpenAI's shape
    assert _error(_post(f"{tight}/v1/chat/completions", {}, {"x-api-key": "wrong"}), 401, None)["code"] == \
        "invalid_api_key"
    assert _error(httpx.get(f"{tight}/v1/chat/completions", headers=key, timeout=10), 405, None)["code"] == \
        "method_not_allowed"

@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"n": 4}, "n"),
        ("/v1/completions", {"logprobs": 5}, "logprobs"),
        ("/v1/completions", {"prompt_logprobs": 5}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": ["a", "b", "c"]}, "prompt"),
        ("/v1/completions", {"prompt": [[5], [6], [7]]}, "prompt"),
        ("/v1/chat/completions", {"n": 4}, "n"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 5}, "top_logprobs"),
    ],
)
def test_caps_past_the_flags_are_400(tight, path, extra, param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    body = {**base, "max_tokens": 1, **extra}
    auth = {"authorization": f"Bearer {KEY}"}
    err = _error(_post(f"{tight}{path}", body, auth), 400, param)
    assert "on this server" in err["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"stop": [f"s{i}" for i in range(129)]}, "stop"),
    ({"stop_token_ids": [5] * 1025}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
])
def test_list_fields_are_capped(frontend, extra, param):
    body = {"prompt": "hi", "max_tokens": 1, **extra}
    err = _error(_post(f"{frontend}/v1/completions", body), 400, param)
    assert "at most" in err["message"]
    at_cap = {k: v[:-1] if isinstance(v, list) else dict(list(v.items())[:-1]) for k, v in extra.items()}
    assert _post(f"{frontend}/v1/completions", {**body, **at_cap}).status_code == 200


def test_caps_at_the_flags_are_served(tight):
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"prompt": ["a", "b"], "n": 3, "logprobs": 4, "max_tokens": 1}
    resp = _post(f"{tight}/v1/completions", body, auth)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 6


def test_every_503_carries_retry_after(stack):
    """A frontend whose engine never answers: /health and requests are 503, each with Retry-After."""
    port = free_port()
    nowhere = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    proc = stack.start("fe-alone", "frontend", "--engine-input", nowhere[0], "--engine-output", nowhere[1],
                       "--port", str(port), "--log-level", "warning")
    base = f"http://127.0.0.1:{port}"
    resp = wait_until(f"{base}/health", proc, timeout=60, status=503)
    assert int(resp.headers["retry-after"]) > 0
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/tokenize", {"prompt": "hi"})):
        resp = _post(f"{base}{path}", body)
        assert _error(resp, 503, None)["code"] == "engine_unavailable"
        assert int(resp.headers["retry-after"]) > 0
    proc.terminate()


@pytest.mark.parametrize(("flag", "value"), [("--max-logprobs", "21"), ("--max-n", "0"),
                                             ("--max-request-body-bytes", "0"), ("--chat-template-timeout", "0")])
def test_a_limit_out_of_range_stops_the_frontend_with_the_reason(flag, value):
    out = subprocess.run([sys.executable, "-m", "services.frontend.server", flag, value, "--port", str(free_port())],
                         check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1 and flag.removeprefix("--").replace("-", "_") in out.stderr, out.stderr
