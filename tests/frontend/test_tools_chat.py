"""Tool calling in chat completions against the real stack, with the openai SDK as the client:
tool_choice required / named (structured outputs force valid calls from a random model), auto
(the hermes parser reads the text; a choice constraint makes the model write a call), none,
streaming in OpenAI's delta shape, the tools and a call history reaching the chat template, and
400s naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
SCHEMAS = {"get_weather": WEATHER, "now": {"type": "object", "properties": {}, "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
GREEDY = {"temperature": 0.0, "seed": 1, "max_tokens": 120}


def _client(base: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def tc(tools_base: str) -> openai.OpenAI:
    return _client(tools_base)


@pytest.fixture(scope="module")
def name(tc: openai.OpenAI) -> str:
    return tc.models.list().data[0].id


def _check_calls(calls, names=("get_weather", "now")) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def _streamed(stream) -> tuple[str, list[dict], str | None]:
    """Content, calls (joined from their deltas) and finish reason of a streamed choice."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for part in choice.delta.tool_calls or []:
            if part.index not in calls:  # a call's first delta carries its id, type and name
                assert part.id.startswith("call_") and part.type == "function" and part.function.name
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_valid_calls(tc, name, parallel):
    out = tc.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=parallel, **GREEDY)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)
    if not parallel:
        assert len(choice.message.tool_calls) == 1


def test_named_calls_that_function_and_streams_the_same_arguments(tc, name):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = tc.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice=choice, **GREEDY)
    calls = whole.choices[0].message.tool_calls
    _check_calls(calls, names=("get_weather",))
    content, streamed, finish = _streamed(tc.chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, tool_choice=choice, stream=True, **GREEDY))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in calls]


def test_auto_parses_calls_from_text_whole_and_streamed(tc, name):
    force = {"structured_outputs": {"choice": ["Sure. " + HERMES_CALL]}}
    whole = tc.chat.completions.create(model=name, messages=ASK, tools=TOOLS, extra_body=force, **GREEDY)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == "Sure. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    content, calls, finish = _streamed(tc.chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, extra_body=force, stream=True, **GREEDY))
    assert "<tool_call>" not in content and content.strip() == "Sure." and finish == "tool_calls"
    assert [c["arguments"] for c in calls] == [message.tool_calls[0].function.arguments]


def test_auto_text_without_a_call_stays_content(tc, name):
    bad = "<tool_call>\n{not json}\n</tool_call>"
    out = tc.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                     extra_body={"structured_outputs": {"choice": [bad]}}, **GREEDY)
    assert out.choices[0].message.content == bad and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def test_a_call_with_a_number_past_a_floats_range_stays_content(tools_base, name):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": 1e999}}\n</tool_call>'
    body = {"model": name, "messages": ASK, "tools": TOOLS, "structured_outputs": {"choice": [bad]}, **GREEDY}
    whole = httpx.post(f"{tools_base}/v1/chat/completions", json=body, timeout=120)
    assert whole.status_code == 200, whole.text  # was a 500: Python reads 1e999 as inf, which JSON cannot write
    message = whole.json()["choices"][0]["message"]
    assert (message["content"], message["tool_calls"]) == (bad, None)
    content, calls, finish = _streamed(_client(tools_base).chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, extra_body={"structured_outputs": {"choice": [bad]}}, stream=True,
        **GREEDY))
    assert (content, calls, finish) == (bad, [], "stop")
    after = httpx.post(f"{tools_base}/v1/chat/completions", json={"model": name, "messages": ASK, "max_tokens": 2},
                       timeout=120)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 2


def test_none_renders_tools_but_makes_no_calls(tc, name, model_tokenizer):
    out = tc.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert not out.choices[0].message.tool_calls and isinstance(out.choices[0].message.content, str)
    text = model_tokenizer.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and out.usage.prompt_tokens == len(model_tokenizer.encode(text, add_special_tokens=False))


def test_call_history_goes_through_the_template(tc, name, model_tokenizer):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    out = tc.chat.completions.create(model=name, messages=history, tools=TOOLS, tool_choice="none", max_tokens=3)
    text = model_tokenizer.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n18 degrees\n</tool_response>" in text and '"name": "get_weather"' in text
    assert out.usage.prompt_tokens == len(model_tokenizer.encode(text, add_special_tokens=False))


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "?"}]}, "messages[1].tool_call_id"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tool_input_is_a_400_naming_the_field(tc, name, extra, param):
    body = {"model": name, "messages": ASK, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        tc.chat.completions.create(**body)
    assert err.value.body["param"] == param, err.value.body
    assert tc.chat.completions.create(model=name, messages=ASK, max_tokens=2).choices  # still serving


def test_auto_needs_the_server_flags(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=2)
    assert err.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in err.value.body["message"]
    out = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY)
    _check_calls(out.choices[0].message.tool_calls)


def test_async_client_required(tools_base, name):
    async def ask():
        async with openai.AsyncOpenAI(base_url=f"{tools_base}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,
                                                        tool_choice="required", **GREEDY)

    _check_calls(asyncio.run(ask()).choices[0].message.tool_calls)
