"""The token that finished a sequence (EOS, or one of stop_token_ids) is not part of its text
unless include_stop_str_in_output asks for it, as in vLLM, also when special tokens are kept
(skip_special_tokens=False, which the pythonic, llama3_json and mistral tool parsers set for
auto tool choice): a chat reply's content must not end in the template's "<|im_end|>"."""

from __future__ import annotations

import json

import httpx
import pytest
from e2e_stack import Stack
from frontend_helpers import wait_until

from pagedserve.serve import free_port

TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def pythonic_base(stack: Stack) -> str:
    port = free_port()
    proc = stack.start_frontend("fe-pythonic", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                                "--return-tokens-as-token-ids", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


def _post(base: str, path: str, body: dict) -> dict:
    resp = httpx.post(f"{base}/v1/{path}", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _chat(base: str, model: str, text: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Time?"}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 40, "structured_outputs": {"choice": [text]}, **extra}
    return _post(base, "chat/completions", body)


def _streamed_content(base: str, model: str, text: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Time?"}], "tools": TOOLS, "stream": True,
            "temperature": 0, "max_tokens": 40, "structured_outputs": {"choice": [text]}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_the_eos_is_not_in_the_text_when_special_tokens_are_kept(frontend, model, model_path, model_tokenizer):
    body = {"model": model, "prompt": "Hello", "temperature": 0, "max_tokens": 20, "skip_special_tokens": False,
            "structured_outputs": {"choice": ["abc"]}}
    choice = _post(frontend, "completions", body)["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("abc", "stop", None)
    kept = _post(frontend, "completions", {**body, "include_stop_str_in_output": True})["choices"][0]
    eos_ids = json.loads((model_path / "generation_config.json").read_text())["eos_token_id"]
    eos_texts = {model_tokenizer.decode([i]) for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids])}
    assert kept["text"].startswith("abc") and kept["text"][3:] in eos_texts


def test_a_stop_token_id_is_not_in_the_text(pythonic_base, model):
    body = {"model": model, "prompt": "Hello", "temperature": 0, "max_tokens": 12, "ignore_eos": True, "logprobs": 0}
    logprobs = _post(pythonic_base, "completions", body)["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in logprobs["tokens"]]  # "token_id:N" (--return-tokens-as-token-ids)
    stop_at = next(i for i in range(4, len(tokens)) if tokens[i] not in tokens[:i])  # its first appearance
    before = _post(pythonic_base, "completions", {**body, "max_tokens": stop_at, "logprobs": None})["choices"][0]
    stopped = _post(pythonic_base, "completions", {**body, "stop_token_ids": [tokens[stop_at]], "logprobs": None})
    choice = stopped["choices"][0]
    assert before["text"] and (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        before["text"], "stop", tokens[stop_at])
    assert stopped["usage"]["completion_tokens"] == stop_at + 1  # the stop token is still generated and counted


def test_auto_tool_content_has_no_end_of_turn_markup(pythonic_base, model):
    reply = _chat(pythonic_base, model, "Sunny.")["choices"][0]
    assert reply["message"]["content"] == "Sunny." and reply["finish_reason"] == "stop"
    assert _streamed_content(pythonic_base, model, "Sunny.") == "Sunny."
    call = _chat(pythonic_base, model, "[now()]")["choices"][0]
    assert call["message"]["content"] is None and call["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in call["message"]["tool_calls"]] == ["now"]


def test_the_frontend_still_answers_a_plain_request(pythonic_base, model):
    out = _post(pythonic_base, "completions", {"model": model, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 2
