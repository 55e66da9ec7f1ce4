"""The JSON-family tool-call parsers (granite, internlm, jamba, phi4_mini_json, xlam) against their
documented formats: calls become tool_calls with JSON arguments, prose stays content, malformed or
cut-short calls stay content, and a stream split anywhere gives the whole text's result."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_streams import check_call_deltas, stream

from shared.processor.parsers.granite import GraniteToolParser
from shared.processor.parsers.internlm import InternLMToolParser
from shared.processor.parsers.jamba import JambaToolParser
from shared.processor.parsers.phi4_mini import Phi4MiniJsonToolParser
from shared.processor.parsers.types import ParsedMessage
from shared.processor.parsers.xlam import XLAMToolParser

PARSERS = {cls.name: cls for cls in (GraniteToolParser, InternLMToolParser, JambaToolParser,
                                       Phi4MiniJsonToolParser, XLAMToolParser)}

PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
NESTED = ("search", {"q": "]}\"\\ <tool_calls> ```", "filters": {"tags": ["a", {"b": [1, 2.5, None, True]}]}})
UNICODE = ("translate", {"text": "naïve café 東京 🌧"})
NOW = ("now", {})


def _list(calls, key: str = "arguments") -> str:
    return json.dumps([{"name": fn, key: args} for fn, args in calls], ensure_ascii=False)


def _internlm(fn: str, args: dict, key: str = "parameters") -> str:
    return f'<|action_start|><|plugin|>\n{json.dumps({"name": fn, key: args}, ensure_ascii=False)}<|action_end|>'


def _calls(name: str, text: str) -> tuple:
    message = PARSERS[name].extract(text)
    return message.content, [(c.name, json.loads(c.arguments)) for c in message.tool_calls]


DOCUMENTED = [
    # Granite 3.x: <|tool_call|> (or the string <tool_call>, or nothing) and a JSON list, from the start
    ("granite", "<|tool_call|>" + _list([PARIS]), (None, [PARIS])),
    ("granite", "<|tool_call|>" + _list([PARIS, NESTED, UNICODE]), (None, [PARIS, NESTED, UNICODE])),
    ("granite", "<tool_call>" + _list([NOW]), (None, [NOW])),
    ("granite", " <|tool_call|> <tool_call>\n" + _list([PARIS]) + "\n", (None, [PARIS])),
    ("granite", _list([PARIS]), (None, [PARIS])),
    ("granite", "<|tool_call|>" + _list([PARIS]) + " Checking.", (" Checking.", [PARIS])),
    ("granite", "It is 4.", ("It is 4.", [])),
    # InternLM2.5: <|action_start|><|plugin|> {"name", "parameters"} <|action_end|>, one per call
    ("internlm", _internlm(*PARIS), (None, [PARIS])),
    ("internlm", "Let me look.\n" + _internlm(*PARIS) + "\n" + _internlm(*NESTED, key="arguments") + "\n",
     ("Let me look.\n", [PARIS, NESTED])),
    ("internlm", _internlm(*UNICODE) + "Done.", ("Done.", [UNICODE])),
    ("internlm", _internlm(*PARIS).removesuffix("<|action_end|>"), (None, [PARIS])),  # vLLM: end token optional
    ("internlm", '<|action_start|><|plugin|>{"name": "now"}<|action_end|>', (None, [NOW])),
    ("internlm", "No tools: 4.", ("No tools: 4.", [])),
    # Jamba: <tool_calls>[...]</tool_calls>
    ("jamba", "<tool_calls>" + _list([PARIS]) + "</tool_calls>", (None, [PARIS])),
    ("jamba", "Sure.\n<tool_calls>\n" + _list([PARIS, NESTED]) + "\n</tool_calls>\nDone.",
     ("Sure.\n\nDone.", [PARIS, NESTED])),
    ("jamba", "<tool_calls>" + _list([UNICODE]) + "</tool_calls><tool_calls>" + _list([NOW]) + "</tool_calls>",
     (None, [UNICODE, NOW])),
    ("jamba", ('<tool_calls>[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": '
     '\\"celsius\\"}"}]</tool_calls>'), (None, [PARIS])),  # arguments as a JSON string, as OpenAI sends them
    # Phi-4-mini: functools[...] ("arguments" or "parameters")
    ("phi4_mini_json", "functools" + _list([PARIS]), (None, [PARIS])),
    ("phi4_mini_json", "functools" + _list([PARIS, NESTED, UNICODE], "parameters"), (None, [PARIS, NESTED, UNICODE])),
    ("phi4_mini_json", "I will call it. functools" + _list([NOW]) + " Then answer.",
     ("I will call it.  Then answer.", [NOW])),
    ("phi4_mini_json", "Use functools.partial or functools [x].", ("Use functools.partial or functools [x].", [])),
    # xLAM: a bare list, a ```json block, [TOOL_CALLS], <tool_call>...</tool_call>, or after </think>
    ("xlam", _list([PARIS, NESTED]), (None, [PARIS, NESTED])),
    ("xlam", "  \n" + _list([UNICODE]) + "\n", (None, [UNICODE])),
    ("xlam", "I will check.\n```json\n" + _list([PARIS]) + "\n```\nOne moment.", ("I will check.\n\nOne moment.", [PARIS])),
    ("xlam", "```\n" + _list([NOW]) + "```", (None, [NOW])),
    ("xlam", "[TOOL_CALLS]" + _list([PARIS]), (None, [PARIS])),
    ("xlam", "<tool_call>" + _list([NESTED]) + "</tool_call>", (None, [NESTED])),
    ("xlam", "<think>Paris, then.</think>\n\n" + _list([PARIS]), ("<think>Paris, then.</think>", [PARIS])),
    ("xlam", "```python\nprint('[TOOL_CALLS]')\n```\nThat prints it.", ("```python\nprint('[TOOL_CALLS]')\n```\nThat prints it.", [])),
    ("xlam", "The list is [1, 2].", ("The list is [1, 2].", [])),
]


@pytest.mark.parametrize(("name", "text", "expected"), DOCUMENTED)
def test_documented_formats(name, text, expected):
    assert _calls(name, text) == expected


MALFORMED = [
    ("granite", "<|tool_call|>" + _list([PARIS])[:-5]),  # cut by max_tokens
    ("granite", "<|tool_call|>[]"),
    ("granite", '<|tool_call|>[{"name": "f", "arguments": {}}, 3]'),
    ("granite", '<|tool_call|>[{"name": "f", "parameters": {}}]'),  # granite's key is "arguments"
    ("granite", '<|tool_call|>{"name": "f", "arguments": {}}'),  # not a list
    ("granite", "Let me call: <|tool_call|>" + _list([PARIS])),  # not at the start
    ("granite", '<|tool_call|>[{"name": "f", "arguments": {"x": 1e999}}]'),
    ("internlm", _internlm(*PARIS)[:-20]),
    ("internlm", '<|action_start|><|plugin|>\n{"name": "f", "parameters": [1]}<|action_end|>'),
    ("internlm", '<|action_start|><|plugin|>\n{"parameters": {}}<|action_end|>'),
    ("internlm", '<|action_start|><|plugin|>\n{"name": "f"} and more<|action_end|>'),
    ("internlm", "<|action_start|><|plugin|>\nnot json<|action_end|>"),
    ("internlm", "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"),  # code, not a tool call
    ("internlm", '<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": NaN}}<|action_end|>'),
    ("jamba", "<tool_calls>" + _list([PARIS])),  # never closed
    ("jamba", "<tool_calls>" + _list([PARIS])[:-3]),
    ("jamba", "<tool_calls>[]</tool_calls>"),
    ("jamba", '<tool_calls>{"name": "f", "arguments": {}}</tool_calls>'),
    ("jamba", "<tool_calls>" + _list([PARIS]) + " extra</tool_calls>"),
    ("jamba", '<tool_calls>[{"name": "f", "arguments": {}, "x": 1}]</tool_calls>'),
    ("phi4_mini_json", "functools" + _list([PARIS])[:-1]),
    ("phi4_mini_json", "functools[1, 2]"),
    ("phi4_mini_json", 'functools[{"name": "f", "arguments": {}, "parameters": {}}]'),
    ("phi4_mini_json", "functools"),
    ("xlam", _list([PARIS])[:-2]),
    ("xlam", "```json\n" + _list([PARIS]) + "\n"),  # the block never closes
    ("xlam", "```json\n" + _list([PARIS]) + "\nand more\n```"),
    ("xlam", '```json\n{"name": "f", "arguments": {}}\n```'),  # not a list
    ("xlam", "[TOOL_CALLS] no list"),
    ("xlam", "<tool_call>" + _list([PARIS])),
    ("xlam", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
    ("xlam", '[{"name": "f", "arguments": {"x": -1e400}}]'),
    ("xlam", '[{"name": "f", "arguments": {}}, "g"]'),
]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_calls_stay_content(name, text):
    assert _calls(name, text) == (text, [])



def _plain(message: ParsedMessage) -> tuple:
    return message.content, [(c.name, c.arguments) for c in message.tool_calls]



@pytest.mark.parametrize(("name", "text"), [(n, t) for n, t, _ in DOCUMENTED] + MALFORMED)
def test_every_split_streams_the_whole_result(name, text):
    cls = PARSERS[name]
    whole = _plain(cls.extract(text))
    for cut in range(len(text) + 1):
        deltas = stream(cls, text, [cut])
        check_call_deltas(deltas, "call_")
        assert _plain(ParsedMessage.from_deltas(deltas)) == whole, cut
    deltas = stream(cls, text, list(range(len(text))))
    check_call_deltas(deltas, "call_")
    assert _plain(ParsedMessage.from_deltas(deltas)) == whole


def test_calls_stream_as_soon_as_they_close():
    """A call is streamed when its list (or block) closes, before the output ends."""
    cases = [(GraniteToolParser, "<|tool_call|>" + _list([PARIS])), (JambaToolParser, "<tool_calls>" + _list([PARIS]) + "</tool_calls>"),
             (Phi4MiniJsonToolParser, "functools" + _list([PARIS])), (XLAMToolParser, "[TOOL_CALLS]" + _list([PARIS])),
             (InternLMToolParser, _internlm(*PARIS))]
    for cls, text in cases:
        deltas = cls().feed(text + " ")
        assert [d.tool_calls[0]["function"].get("name") for d in deltas][:1] == ["get_weather"], cls.name


def test_special_markers():
    assert GraniteToolParser.special_markers == ("<|tool_call|>",)
    assert InternLMToolParser.special_markers == ("<|action_start|>", "<|plugin|>", "<|action_end|>")
    assert JambaToolParser.special_markers == ("<tool_calls>", "</tool_calls>")
    assert Phi4MiniJsonToolParser.special_markers == XLAMToolParser.special_markers == ()


MARKUP = ["<|tool_call|>", "<tool_call>", "</tool_call>", "<|action_start|>", "<|plugin|>", "<|action_end|>",
          "<tool_calls>", "</tool_calls>", "functools", "```", "```json", "[TOOL_CALLS]", "</think>", "{", "}", "[",
          "]", '"', "\\", "\n", " ", ","]
RENDER = {
    "granite": lambda calls: "<|tool_call|>" + _list(calls),
    "internlm": lambda calls: "".join(_internlm(fn, args) for fn, args in calls),
    "jamba": lambda calls: "<tool_calls>" + _list(calls) + "</tool_calls>",
    "phi4_mini_json": lambda calls: "functools" + _list(calls),
    "xlam": lambda calls: "```json\n" + _list(calls) + "\n```",
}


@st.composite
def outputs(draw, name: str) -> str:
    """Model text mixing prose, markup, valid calls, and calls cut short."""
    pieces = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "markup", "call", "cut", "bare"]))
        if kind == "text":
            pieces.append(draw(st.text(alphabet="ab <>{}[]|`;,\"\\\n", max_size=8)))
        elif kind == "markup":
            pieces.append(draw(st.sampled_from(MARKUP)))
        else:
            calls = draw(st.lists(st.sampled_from([PARIS, NESTED, UNICODE, NOW]), min_size=1, max_size=2))
            call = _list(calls) if kind == "bare" else RENDER[name](calls)
            pieces.append(call if kind != "cut" else call[: draw(st.integers(0, len(call)))])
    return "".join(pieces)


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_of_mixed_output_streams_the_whole_result(name, data):
    cls = PARSERS[name]
    text = data.draw(outputs(name))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=12))))
    deltas = stream(cls, text, cuts)
    check_call_deltas(deltas, "call_")
    assert _plain(ParsedMessage.from_deltas(deltas)) == _plain(cls.extract(text))
