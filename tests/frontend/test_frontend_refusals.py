"""One frontend process against the real engine and worker (the tiny llama checkpoint), on what it
refuses or cuts short: the bad-input matrix, out-of-vocabulary prompts, the API key, and aborts on
client disconnect (checked through the engine itself), as its metrics count them."""

from __future__ import annotations

import httpx
import openai
import pytest
from frontend_helpers import GREEDY, metric_value, wait_until
from test_frontend_service import MAX_MODEL_LEN

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(120)

VOCAB_SIZE = 1024  # the tiny llama checkpoint's
MODEL = "<model>"  # stands for the served model's name in parametrized bodies


BAD_BODIES = [
    (b"{not json", 400, "invalid_json", None),
    (b"", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "invalid_type", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "invalid_value", "temperature"),
    ({"model": MODEL, "prompt": "x", "n": 1000}, 400, "invalid_value", "n"),
    ({"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "invalid_value", "min_tokens"),
    ({"model": MODEL, "prompt": "x", "stop": ""}, 400, "invalid_value", "stop"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": [1, VOCAB_SIZE]}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": "x", "stop_token_ids": [99999]}, 400, "invalid_value", "stop_token_ids"),
    ({"model": MODEL, "prompt": [[]]}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": [5] * MAX_MODEL_LEN}, 400, "context_length_exceeded", "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_BODIES)
def test_bad_completion_requests(frontend, model, body, status, code, param):
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kwargs = {"json": {k: model if v == MODEL else v for k, v in body.items()}}
    resp = httpx.post(f"{frontend}/v1/completions", timeout=10, **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param), err


def test_bad_chat_requests_and_out_of_vocabulary_prompts(frontend, client, model):
    resp = httpx.post(f"{frontend}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x " * (2 * MAX_MODEL_LEN)}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    resp = httpx.post(f"{frontend}/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    # The engine refuses token ids outside its vocabulary; the frontend, which knows the engine's
    # vocabulary size, refuses them first, whole or streamed.
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model=model, prompt=[1, VOCAB_SIZE], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="out of range"):
        list(client.completions.create(model=model, prompt=[VOCAB_SIZE + 7], max_tokens=2, stream=True))
    assert httpx.get(f"{frontend}/nowhere").json()["error"]["code"] == "not_found"
    # still serving
    assert client.completions.create(model=model, prompt="Hello", max_tokens=2, **GREEDY).choices[0].text


# ~1000 tokens: seconds of work, so such a request is still running when its client leaves.
LONG = {"prompt": "Hello", "max_tokens": MAX_MODEL_LEN - 24, "ignore_eos": True}


def _scheduled_tokens(stack) -> float:
    """Tokens the engine has scheduled so far (prompt and generated, all requests)."""
    return stack.engine_metric("pagedserve_engine_scheduled_tokens_per_step_sum")


def test_client_disconnect_aborts_streaming_and_whole(frontend, stack, model):
    body = {"model": model, **LONG, "stream": True}
    scheduled = _scheduled_tokens(stack)
    with httpx.stream("POST", f"{frontend}/v1/completions", json=body, timeout=10) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert stack.engine_load().num_running == 1
    stack.wait_engine_idle(10.0)
    # The engine stopped generating when the client left: far fewer tokens than asked for.
    assert _scheduled_tokens(stack) - scheduled < LONG["max_tokens"], "streaming request not aborted"
    before, scheduled = httpx.get(f"{frontend}/metrics").text, _scheduled_tokens(stack)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{frontend}/v1/chat/completions", timeout=0.2,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG["max_tokens"],
                         "ignore_eos": True})
    stack.wait_engine_idle(10.0)
    assert _scheduled_tokens(stack) - scheduled < LONG["max_tokens"], "whole request not aborted"
    after = httpx.get(f"{frontend}/metrics").text
    labels = {"endpoint": "/v1/chat/completions", "finish_reason": "abort"}
    assert (metric_value(after, "pagedserve_frontend_requests_total", **labels)
            - metric_value(before, "pagedserve_frontend_requests_total", **labels)) == 1
    assert httpx.get(f"{frontend}/health").status_code == 200


def test_metrics_count_aborts_and_errors(frontend, client, model, stack):
    def value(name: str, **labels: str) -> float:
        return metric_value(httpx.get(f"{frontend}/metrics").text, name, model_name=model, **labels)

    def reasons() -> dict[str, float]:
        return {r: value("pagedserve_frontend_requests_total", finish_reason=r) for r in ("abort", "error")}

    start, e2e = reasons(), value("pagedserve_frontend_e2e_request_latency_seconds_count")
    # Refused before admission (out of vocabulary): neither an error nor a request at all.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[VOCAB_SIZE], max_tokens=2)
    body, scheduled = {"model": model, **LONG, "stream": True}, _scheduled_tokens(stack)
    with httpx.stream("POST", f"{frontend}/v1/completions", json=body, timeout=10) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    stack.wait_engine_idle(10.0)
    assert _scheduled_tokens(stack) - scheduled < LONG["max_tokens"], "request not aborted"
    stack.idle_metrics(("fe-main",))  # in flight back to 0
    end = reasons()
    assert (end["abort"] - start["abort"], end["error"] - start["error"]) == (1, 0)
    assert value("pagedserve_frontend_e2e_request_latency_seconds_count") - e2e == 1


def test_api_key(stack, model):
    proc = stack.start_frontend("fe-keyed", "--api-key", "sekrit", "--served-model-name", "alias",
                                port=(port := free_port()))
    base = f"http://127.0.0.1:{port}"
    wait_until(f"{base}/health", proc)  # /health is not behind the key
    body = {"model": "alias", "prompt": "Hello", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sekrit"}):
        resp = httpx.post(f"{base}/v1/completions", json=body, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
    assert ok.completions.create(**body).model == "alias"
    with pytest.raises(openai.NotFoundError):
        ok.completions.create(model=model, prompt="x", max_tokens=2)


NOT_TEXT_PARTS = [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, ".type", "image content"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, ".type", "audio content"),
    ({"type": "file", "file": {"file_id": "file-1"}}, ".type", "file content"),
    ({"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}, ".type", "video content"),
    ({"type": "hologram"}, ".type", "unknown content part type 'hologram'"),
    ({"type": "text"}, ".text", "needs 'text' as a string"),
    ({"text": "hi"}, "", "must be an object with a 'type'"),
]


@pytest.mark.parametrize(("part", "below", "says"), NOT_TEXT_PARTS)
def test_non_text_content_parts_get_a_400_naming_the_part(frontend, part, below, says):
    """A text-only model: an image, audio or file part is a 400 that says so and names the part
    (it had been "'messages[0].content.str': Input should be a valid string")."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    for path in ("/v1/chat/completions", "/tokenize"):
        resp = httpx.post(f"{frontend}{path}", json={"messages": messages, "max_tokens": 1} if "chat" in path
                          else {"messages": messages})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == f"messages[1].content[1]{below}" and err["code"] == "invalid_value", err
        assert says in err["message"] and err["type"] == "invalid_request_error", err
        if err["message"].startswith("image"):
            assert "text only" in err["message"]


def test_text_and_refusal_parts_are_the_text_they_hold(frontend):
    def tokens(content) -> list[int]:
        resp = httpx.post(f"{frontend}/tokenize", json={"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]})
        assert resp.status_code == 200, resp.text
        return resp.json()["tokens"]

    assert tokens([{"type": "text", "text": "No"}, {"type": "refusal", "refusal": "thanks"}]) == tokens("No\nthanks")
    for content in (5, {"type": "text", "text": "No"}):
        resp = httpx.post(f"{frontend}/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "messages[0].content", err
        assert "a string or a list of content parts" in err["message"]
    answers = [httpx.post(f"{frontend}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
    }).json()["choices"][0]["message"]["content"] for content in ("Hi", [{"type": "text", "text": "Hi"}])]
    assert answers[0] == answers[1] and answers[0]
