"""Reasoning outputs against the real stack (--reasoning-parser qwen3, with hermes tool parsing):
message.reasoning_content and reasoning, streamed delta.reasoning_content, chat_template_kwargs
reaching the template, usage's reasoning_tokens, and tool calls parsed after the reasoning. A
choice constraint makes the random model write the text under test."""

from __future__ import annotations

import openai
import pytest
from frontend_helpers import wait_until

from pagedserve.serve import free_port

ASK = [{"role": "user", "content": "Is it sunny?"}]
THINK = {"enable_thinking": True}  # the template opens <think> in the prompt


@pytest.fixture(scope="module")
def rc(stack) -> openai.OpenAI:
    port = free_port()
    proc = stack.start_frontend("fe-reason", "--reasoning-parser", "qwen3", "--enable-auto-tool-choice",
                                "--tool-call-parser", "hermes", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(rc: openai.OpenAI) -> str:
    return rc.models.list().data[0].id


def _ask(rc, name, text: str, kwargs: dict | None = None, **extra):
    body = {"structured_outputs": {"choice": [text]}}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    return rc.chat.completions.create(model=name, messages=ASK, temperature=0.0, max_tokens=80, extra_body=body,
                                      **extra)


def test_reasoning_is_split_from_the_content(rc, name):
    text = "<think>Clouds are thin today.</think>Yes, sunny."
    out = _ask(rc, name, text)
    message = out.choices[0].message
    assert message.content == "Yes, sunny." and out.choices[0].finish_reason == "stop"
    extra = message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "Clouds are thin today."
    assert 0 < out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens


def test_template_kwargs_open_the_reasoning_in_the_prompt(rc, name):
    opened = _ask(rc, name, "thin clouds</think>Sunny.", THINK).choices[0].message
    assert (opened.model_extra["reasoning_content"], opened.content) == ("thin clouds", "Sunny.")
    closed = _ask(rc, name, "thin clouds</think>Sunny.", {"enable_thinking": False})
    message = closed.choices[0].message
    assert message.model_extra["reasoning_content"] is None and message.content == "thin clouds</think>Sunny."
    assert closed.usage.completion_tokens_details.reasoning_tokens == 0


def test_streamed_reasoning_joins_to_the_whole(rc, name):
    text = "weighing it</think>Probably."
    whole = _ask(rc, name, text, THINK)
    reasoning, content, finish, usage = "", "", None, None
    for chunk in _ask(rc, name, text, THINK, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("weighing it", "Probably.", "stop")
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_tool_calls_parse_after_the_reasoning(rc, name):
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "now"}}]
    out = _ask(rc, name, "<think>I should check the <tool_call> time</think>" + call, tools=tools)
    message = out.choices[0].message
    assert message.model_extra["reasoning_content"] == "I should check the <tool_call> time"
    assert [c.function.name for c in message.tool_calls] == ["now"] and message.content is None
    assert out.choices[0].finish_reason == "tool_calls"
