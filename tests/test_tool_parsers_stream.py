"""Streaming tool-call parsers: for any split of a model's text into deltas, the streamed
content, calls and argument fragments are exactly the non-streamed result, and the deltas have
OpenAI's shape (a call's first delta carries index, id, type and name; later ones arguments)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_streams import check_call_deltas, stream

from shared.processor.parsers import TOOL_PARSERS, get_tool_parser
from shared.processor.parsers.forced import ForcedCallsParser

FORMATS = sorted({cls.name for cls in TOOL_PARSERS.values()})  # each format once (aliases share one)
RENDERED = ("hermes", "llama3_json", "mistral", "pythonic")  # _render writes these; the other families'
# modules (test_tool_parsers_deepseek_kimi, _xml, _json_family) split their own formats at every boundary
ARGS = [{}, {"city": "Paris"}, {"n": [1, 2.5, None, True], "s": "x}]\"\\n"}, {"q": "<tool_call>[TOOL_CALLS];"}]


def _render(name: str, calls: list[tuple[str, dict]]) -> str:
    """Calls in the parser's documented format."""
    if name == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": "{fn}", "arguments": {json.dumps(a)}}}\n</tool_call>'
                         for fn, a in calls)
    if name == "llama3_json":
        return "<|python_tag|>" + "; ".join(json.dumps({"name": fn, "parameters": a}) for fn, a in calls)
    if name == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": fn, "arguments": a} for fn, a in calls])
    if name == "pythonic":
        return "[" + ", ".join(fn + "(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")" for fn, a in calls) + "]"
    return json.dumps([{"name": fn, "parameters": a} for fn, a in calls])


MARKUP = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<|python_start|>",
          "<|python_end|>", "{", "}", "[", "]", "(", ")", '"', "'", ";", ",", "\\", "\n", " ", "=", ":"]
TEXT = st.text(alphabet="ab <>{}[]();,\"'\\\n=:_/|", max_size=8)


@st.composite
def outputs(draw, name: str) -> str:
    """Model text mixing prose, markup, valid calls, and calls cut short."""
    pieces = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "markup", "call", "cut"]))
        if kind == "text":
            pieces.append(draw(TEXT))
        elif kind == "markup":
            pieces.append(draw(st.sampled_from(MARKUP)))
        else:
            fns = draw(st.lists(st.sampled_from(["f", "get_weather"]), min_size=1, max_size=2))
            call = _render(name, [(fn, draw(st.sampled_from(ARGS))) for fn in fns])
            pieces.append(call if kind == "call" else call[: draw(st.integers(0, len(call)))])
    return "".join(pieces)


def _parser(name: str):
    return ForcedCallsParser if name == "forced" else get_tool_parser(name)



def _plain(message) -> tuple:
    return message.content, message.reasoning_content, [(c.name, c.arguments) for c in message.tool_calls]



@pytest.mark.parametrize("name", [*FORMATS, "forced"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_streams_the_whole_result(name, data):
    from shared.processor.parsers.types import ParsedMessage

    cls = _parser(name)
    text = data.draw(outputs(name))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    deltas = stream(cls, text, cuts)
    check_call_deltas(deltas, "functions." if name == "kimi_k2" else "call_")  # kimi_k2 keeps its ids
    assert _plain(ParsedMessage.from_deltas(deltas)) == _plain(cls.extract(text))


@pytest.mark.parametrize("name", [*RENDERED, "forced"])
def test_every_character_boundary(name):
    """Two calls with content around them, split at every boundary and char by char."""
    from shared.processor.parsers.types import ParsedMessage

    cls = _parser(name)
    calls = [("f", ARGS[2]), ("g", ARGS[3])]
    text = _render(name, calls)
    if name in ("hermes", "mistral"):  # formats that allow prose around calls
        text = f"Let me look.\n{text}\nDone."
    whole = _plain(cls.extract(text))
    assert whole[2] == [(fn, json.dumps(a, ensure_ascii=False)) for fn, a in calls]
    assert whole[0] == ("Let me look.\n\nDone." if name in ("hermes", "mistral") else None)
    for cut in range(len(text) + 1):
        assert _plain(ParsedMessage.from_deltas(stream(cls, text, [cut]))) == whole
    assert _plain(ParsedMessage.from_deltas(stream(cls, text, list(range(len(text)))))) == whole
