"""Tool-call parsers against their model families' documented formats: calls become tool_calls
with JSON arguments, prose stays content, malformed or cut-short calls stay content (never an
exception), and Python calls are read without running anything."""

from __future__ import annotations

import json

import pytest

from shared.processor.parsers import TOOL_PARSERS, get_tool_parser


def _calls(name: str, text: str) -> tuple:
    message = get_tool_parser(name).extract(text)
    return message.content, [(c.name, json.loads(c.arguments)) for c in message.tool_calls]


PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})


@pytest.mark.parametrize(("name", "text", "expected"), [
    # Qwen2.5 / Qwen3 / Hermes 2 Pro
    ("hermes", ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>'), (None, [PARIS])),
    ("hermes", ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'),
     ("I will check.\n", [PARIS, ("now", {})])),
    ("hermes", "No tools needed: 4.", ("No tools needed: 4.", [])),
    # Llama 3.1+: JSON with "parameters", optionally after <|python_tag|>, several joined by ";"
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', (None, [PARIS])),
    ("llama3_json", ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "now", "parameters": {}}'), (None, [PARIS, ("now", {})])),
    ("llama3_json", '{"answer": 4}', ('{"answer": 4}', [])),  # JSON that is not a call is content
    ("llama3_json", 'The call would be {"name": "now", "parameters": {}}',
     ('The call would be {"name": "now", "parameters": {}}', [])),
    # Mistral: [TOOL_CALLS] and a JSON list (v3), or name[ARGS]{...} per call (v11+)
    ("mistral", ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
     '{"name": "now", "arguments": {}}]'), (None, [PARIS, ("now", {})])),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]now[ARGS]{}',
     (None, [PARIS, ("now", {})])),
    ("mistral", "Plain [answer].", ("Plain [answer].", [])),
    # Llama 3.2 / 4: a Python list of calls, optionally between <|python_start|> and <|python_end|>
    ("pythonic", '[get_weather(city="Paris", unit=\'celsius\'), now()]', (None, [PARIS, ("now", {})])),
    ("pythonic", '<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', (None, [PARIS])),
    ("pythonic", "[search(q=('a', 1), opts={'deep': True, 'n': None})]",
     (None, [("search", {"q": ["a", 1], "opts": {"deep": True, "n": None}})])),
    ("pythonic", "[1, 2, 3]", ("[1, 2, 3]", [])),
])
def test_documented_formats(name, text, expected):
    assert _calls(name, text) == expected


@pytest.mark.parametrize(("name", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut by max_tokens
    ("hermes", "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),  # not strict JSON
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>'),  # inf: no JSON can say it
    ("llama3_json", '{"name": "f", "parameters": {"x": -1e400}}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1e999}}]'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": 1e999}'),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}'),
    ("llama3_json", '{"name": "f", "parameters": {}, "extra": 1}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}'),
    ("mistral", "[TOOL_CALLS] not a list"),
    ("mistral", '[TOOL_CALLS][{"name": "f"}, 3]'),
    ("pythonic", "[f(1, 2)]"),  # positional arguments
    ("pythonic", "[f(**{'a': 1})]"),
    ("pythonic", "[f(a=__import__('os').system('touch /tmp/pwned'))]"),  # never evaluated
    ("pythonic", "[f(a=1e999)]"),  # inf is not JSON
    ("pythonic", "[f(a={1, 2})]"),  # a set is not JSON
    ("pythonic", "[f(a=" + "[" * 5000 + "]" * 5000 + ")]"),  # too deep for the parser
    ("pythonic", "[f(a="),
])
def test_malformed_calls_stay_content(name, text):
    assert _calls(name, text) == (text, [])


def test_text_around_a_list_call_is_content():
    content, calls = _calls("pythonic", "  [now()]  and then some")
    assert (content, calls) == ("  and then some", [("now", {})])


# two calls of the function "a" with no arguments, in each format
TWO_CALLS = {
    "hermes": '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "a", "arguments": {}}</tool_call>',
    "llama3_json": '{"name": "a", "parameters": {}}; {"name": "a", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]',
    "pythonic": "[a(), a()]",
    "qwen3_coder": "<tool_call>\n<function=a>\n</function>\n</tool_call>" * 2,
    "glm45": "<tool_call>a\n</tool_call>" * 2,
    "deepseek_v3": "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>a\n```json\n{}\n```<｜tool▁call▁end｜>" * 2
                   + "<｜tool▁calls▁end｜>",
    "deepseek_v31": "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>a<｜tool▁sep｜>{}<｜tool▁call▁end｜>" * 2
                    + "<｜tool▁calls▁end｜>",
    "kimi_k2": "<|tool_calls_section_begin|>" + "".join(
        f"<|tool_call_begin|>functions.a:{i}<|tool_call_argument_begin|>{{}}<|tool_call_end|>" for i in range(2))
               + "<|tool_calls_section_end|>",
    "granite": '<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]',
    "internlm": '<|action_start|><|plugin|>\n{"name": "a", "parameters": {}}<|action_end|>' * 2,
    "jamba": '<tool_calls>[{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]</tool_calls>',
    "phi4_mini_json": 'functools[{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]',
    "xlam": '[{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]',
}


@pytest.mark.parametrize("name", list(TOOL_PARSERS))
def test_calls_have_distinct_openai_ids(name):
    cls = get_tool_parser(name)
    calls = [c.to_openai() for c in cls.extract(TWO_CALLS[cls.name]).tool_calls]
    assert [c["function"] for c in calls] == [{"name": "a", "arguments": "{}"}] * 2
    assert all(c["type"] == "function" for c in calls) and calls[0]["id"] != calls[1]["id"]
    # kimi_k2 keeps the model's own ids (its template writes them back); the others make OpenAI's
    prefix = "functions.a:" if name == "kimi_k2" else "call_"
    assert all(c["id"].startswith(prefix) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_streamed_deltas_have_openai_shape():
    parser = get_tool_parser("hermes")()
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    deltas = [d.to_openai() for piece in text for d in parser.feed(piece)] + [d.to_openai() for d in parser.finish()]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    head, args = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert head == {"index": 0, "id": head["id"], "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}
    assert args == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}


def test_markers_that_are_special_tokens_are_declared():
    """The caller must detokenize with skip_special_tokens=False for these parsers."""
    assert get_tool_parser("mistral").special_markers == ("[TOOL_CALLS]", "[ARGS]")
    assert "<|python_tag|>" in get_tool_parser("llama3_json").special_markers
    assert get_tool_parser("hermes").special_markers == ()


def test_unknown_parser_lists_names():
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("hermes2")
