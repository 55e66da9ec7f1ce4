"""Tool request checks: each bad input raises a ValueError (InvalidRequest) whose param names the
field, as OpenAI's 400 does; good input comes back normalized."""

from __future__ import annotations

import pytest

from shared.processor.errors import InvalidRequest
from shared.processor.parsers.validation import Tool, check_tool_choice, check_tool_messages, check_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _error(fn, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    assert isinstance(info.value, ValueError)
    assert info.value.param in str(info.value)
    return info.value


@pytest.mark.parametrize(("tools", "param"), [
    ({"type": "function"}, "tools"),
    ([WEATHER] * 129, "tools"),
    (["get_weather"], "tools[0].type"),
    ([{"type": "code_interpreter"}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "bad name!"}}], "tools[1].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": "a string"}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strnig"}}}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}}}], "tools[0].function.parameters"),
])
def test_bad_tools_name_the_field(tools, param):
    assert _error(check_tools, tools).param == param


def test_good_tools_normalized():
    tools = check_tools([WEATHER, {"type": "function", "function": {"name": "now"}}])
    assert tools == [Tool("get_weather", "Weather now", WEATHER["function"]["parameters"]), Tool("now")]
    assert [t.to_openai() for t in tools] == [WEATHER, {"type": "function", "function": {"name": "now"}}]
    assert check_tools(None) == []


@pytest.mark.parametrize(("choice", "tools", "parallel", "param"), [
    ("required", [], None, "tool_choice"),  # required with no tools
    ("none", [], None, "tool_choice"),  # any tool_choice without tools
    ("sometimes", [Tool("f")], None, "tool_choice"),
    ({"type": "function", "function": {"name": "g"}}, [Tool("f")], None, "tool_choice.function.name"),
    ({"type": "function"}, [Tool("f")], None, "tool_choice"),
    ({"function": {"name": "f"}}, [Tool("f")], None, "tool_choice"),
    ("auto", [Tool("f")], "yes", "parallel_tool_calls"),
])
def test_bad_tool_choice_names_the_field(choice, tools, parallel, param):
    assert _error(check_tool_choice, choice, tools, parallel).param == param


def test_tool_choice_defaults_and_normalizes():
    assert check_tool_choice(None, []) == "none"
    assert check_tool_choice(None, [Tool("f")]) == "auto"
    assert check_tool_choice("required", [Tool("f")], False) == "required"
    named = {"type": "function", "function": {"name": "f", "extra": 1}}
    assert check_tool_choice(named, [Tool("f")]) == {"type": "function", "function": {"name": "f"}}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "tool", "content": "4"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "4", "tool_call_id": "call_1"}],
     "messages[1].tool_call_id"),  # answers no earlier call
    ([{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "4", "tool_call_id": "call_2"}],
     "messages[1].tool_call_id"),
    ([{"role": "tool", "content": "4", "tool_call_id": "call_1"}, {"role": "assistant", "tool_calls": [CALL]}],
     "messages[0].tool_call_id"),  # the call comes later
    ([{"role": "assistant", "tool_calls": "f()"}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [CALL, CALL]}], "messages[0].tool_calls[1].id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}],
     "messages[0].tool_calls[0].function"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom"}]}], "messages[0].tool_calls[0]"),
])
def test_bad_tool_messages_name_the_field(messages, param):
    assert _error(check_tool_messages, messages).param == param


def test_a_tool_conversation_passes():
    check_tool_messages([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "24C", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Paris 18C, Rome 24C."},
    ])
