"""The XML-style tool-call parsers whose argument values are raw text typed by the tool's JSON
schema (vLLM's qwen3_coder and glm45): the formats the models' chat templates render, values
converted as vLLM converts them, malformed or cut-short calls kept as content, streaming equal
to the whole text at every split, and a chat request's tools reaching the parser."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.processor.chat import ChatParsers, ChatPlan
from shared.processor.parsers import TOOL_PARSERS
from shared.processor.parsers.glm45 import Glm45ToolParser
from shared.processor.parsers.qwen3_coder import Qwen3CoderToolParser
from shared.processor.parsers.types import ParsedMessage
from shared.processor.parsers.validation import check_tools

PROPERTIES = {"s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
              "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": "array"}, "e": {"enum": ["x"]}}
TOOLS = check_tools([
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": PROPERTIES}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters schema
])


def qwen(name: str, args: list[tuple[str, str]]) -> str:
    """A call as Qwen3-Coder's chat template renders it (values already text)."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args)
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def glm(name: str, args: list[tuple[str, str]]) -> str:
    """A call as GLM-4.5's chat template renders it (values already text)."""
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args)
    return f"<tool_call>{name}\n{pairs}</tool_call>"


def _parse(cls, text: str, tools=TOOLS) -> tuple:
    parser = cls(tools)
    message = ParsedMessage.from_deltas(parser.feed(text) + parser.finish())
    return message.content, [(c.name, json.loads(c.arguments)) for c in message.tool_calls]


def _stream(cls, text: str, cuts: list[int], tools=TOOLS) -> tuple:
    parser, deltas, last = cls(tools), [], 0
    for cut in [*cuts, len(text)]:
        deltas += parser.feed(text[last:cut])
        last = cut
    message = ParsedMessage.from_deltas(deltas + parser.finish())
    return message.content, [(c.name, c.arguments) for c in message.tool_calls]


PARIS = ("get_weather", {"city": "Paris", "days": 3})
CODE = 'def f(x):\n    return "<b>" + x\n'  # a multi-line string value with quotes and a tag


@pytest.mark.parametrize(("cls", "render"), [(Qwen3CoderToolParser, qwen), (Glm45ToolParser, glm)])
def test_documented_format(cls, render):
    one = render("get_weather", [("city", "Paris"), ("days", "3")])
    assert _parse(cls, one) == (None, [PARIS])
    two = "I will check.\n" + one + "\n" + render("now", [])
    assert _parse(cls, two) == ("I will check.\n", [PARIS, ("now", {})])
    assert _parse(cls, render("f", [("s", CODE.strip())])) == (None, [("f", {"s": CODE.strip()})])
    assert _parse(cls, "No tools needed: 4.") == ("No tools needed: 4.", [])


def test_qwen3_coder_exact_template_text():
    """Qwen3-Coder's template: each value on lines of its own, one newline trimmed each side."""
    text = ("Sure.\n\n<tool_call>\n<function=f>\n<parameter=s>\n\n" + CODE + "\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>")
    assert _parse(Qwen3CoderToolParser, text) == ("Sure.\n\n", [("f", {"s": "\n" + CODE}), ("now", {})])


def test_glm45_exact_template_text():
    """GLM-4.5's template, and a name followed by a space (seen from GLM-4.5-Air); values stripped."""
    text = ("\n<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>\n" + CODE + "</arg_value>\n</tool_call>"
            "\n<tool_call>get_weather <arg_key> city </arg_key> <arg_value> Paris </arg_value> </tool_call>")
    assert _parse(Glm45ToolParser, text) == (None, [("f", {"s": CODE.strip()}), ("get_weather", {"city": "Paris"})])
    assert _parse(Glm45ToolParser, "<tool_call>now</tool_call>") == (None, [("now", {})])


@pytest.mark.parametrize(("key", "text", "value"), [
    ("s", "42", "42"), ("s", "  two words ", "  two words "), ("e", "x", "x"),  # string / no type: as is
    ("i", "42", 42), ("i", "-7", -7), ("i", "4.5", "4.5"), ("i", "many", "many"),
    ("n", "2.5", 2.5), ("n", "3.0", 3), ("n", "1e3", 1000), ("n", "1e999", "1e999"), ("n", "nan", "nan"),
    ("b", "true", True), ("b", "False", False), ("b", "yes", False),  # vLLM: not "true" is false
    ("o", '{"k": [1, null]}', {"k": [1, None]}), ("o", "{'k': (1, True)}", {"k": [1, True]}), ("o", "{bad", "{bad"),
    ("o", "{1, 2}", "{1, 2}"),  # a Python set is no JSON value
    ("a", '[1, "x"]', [1, "x"]), ("a", "[1, 'x']", [1, "x"]),
    ("s", "null", None), ("i", "NULL", None), ("zz", "null", None),  # null for any type
    ("zz", "[1]", "[1]"),  # a key the schema does not name: text
])
def test_qwen3_coder_values_typed_by_schema(key, text, value):
    assert _parse(Qwen3CoderToolParser, qwen("f", [(key, text)])) == (None, [("f", {key: value})])


@pytest.mark.parametrize("name", ["now", "unknown_fn"])  # a tool without parameters; a function not in tools
def test_qwen3_coder_without_schema_keeps_text(name):
    text = qwen(name, [("n", "3"), ("o", '{"a": 1}'), ("z", "null")])
    assert _parse(Qwen3CoderToolParser, text) == (None, [(name, {"n": "3", "o": '{"a": 1}', "z": None})])
    assert _parse(Qwen3CoderToolParser, text, tools=()) == _parse(Qwen3CoderToolParser, text)


@pytest.mark.parametrize(("key", "text", "value"), [
    ("s", "42", "42"), ("s", "null", "null"), ("s", "[1, 2]", "[1, 2]"),  # string type: text, stripped
    ("i", "42", 42), ("n", "2.5", 2.5), ("b", "true", True), ("b", "yes", "yes"),
    ("o", '{"k": [1, null]}', {"k": [1, None]}), ("o", "{'k': (1, True)}", {"k": [1, True]}), ("o", "{bad", "{bad"),
    ("a", "[1, 'x']", [1, "x"]), ("a", "{1, 2}", "{1, 2}"), ("n", "1e999", "1e999"), ("n", "NaN", "NaN"),
    ("i", "null", None), ("e", "x", "x"), ("e", "7", 7),  # no type: read as JSON or a literal
    ("zz", "[1]", [1]), ("zz", "hello world", "hello world"),  # a key the schema does not name: the same
])
def test_glm45_values_typed_by_schema(key, text, value):
    assert _parse(Glm45ToolParser, glm("f", [(key, text)])) == (None, [("f", {key: value})])


@pytest.mark.parametrize("name", ["now", "unknown_fn"])
def test_glm45_without_schema_reads_values(name):
    text = glm(name, [("n", "3"), ("s", "Paris"), ("z", "null")])
    assert _parse(Glm45ToolParser, text) == (None, [(name, {"n": 3, "s": "Paris", "z": None})])
    assert _parse(Glm45ToolParser, text, tools=()) == _parse(Glm45ToolParser, text)


MALFORMED = [
    (Qwen3CoderToolParser, qwen("get_weather", [("city", "Paris")])[:-5]),  # cut by max_tokens
    (Qwen3CoderToolParser, "<tool_call>\n<function=f>\n<parameter=s>\nhi\n</parameter>\n"),
    (Qwen3CoderToolParser, "<tool_call>\n<function=f>\n<parameter=s>\nhi\n</function>\n</tool_call>"),  # unclosed
    (Qwen3CoderToolParser, "<tool_call>\n<function=f>\nprose\n</function>\n</tool_call>"),
    (Qwen3CoderToolParser, "<tool_call>\n<function=f>\n</tool_call>"),
    (Qwen3CoderToolParser, "<tool_call>\n<function=>\n</function>\n</tool_call>"),
    (Qwen3CoderToolParser, "<tool_call>\n<function=f>\n</function>\n<function=g>\n</function>\n</tool_call>"),
    (Qwen3CoderToolParser, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),  # hermes JSON
    (Qwen3CoderToolParser, "<function=f>\n</function>"),  # no <tool_call> around it
    (Glm45ToolParser, glm("get_weather", [("city", "Paris")])[:-3]),
    (Glm45ToolParser, "<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>hi"),
    (Glm45ToolParser, "<tool_call>f\n<arg_key>s</arg_key>\n</tool_call>"),  # a key without a value
    (Glm45ToolParser, "<tool_call>f\n<arg_key>s</arg_key>x<arg_value>hi</arg_value>\n</tool_call>"),
    (Glm45ToolParser, "<tool_call>f\nprose\n</tool_call>"),
    (Glm45ToolParser, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
    (Glm45ToolParser, "<tool_call></tool_call>"),
    (Glm45ToolParser, "<tool_call>two words\n</tool_call>"),
]


@pytest.mark.parametrize(("cls", "text"), MALFORMED)
def test_malformed_calls_stay_content(cls, text):
    assert _parse(cls, text) == (text, [])


def test_only_the_malformed_block_stays_content():
    bad = "<tool_call>\n<function=f>\nprose\n</function>\n</tool_call>"
    text = bad + qwen("now", []) + " done"
    assert _parse(Qwen3CoderToolParser, text) == (bad + " done", [("now", {})])


TEXTS = [
    (Qwen3CoderToolParser, "Let me look.\n" + qwen("f", [("s", CODE), ("i", "4"), ("o", '{"a": [1]}')])
     + "\n" + qwen("now", []) + "\nDone."),
    (Glm45ToolParser, "Let me look.\n" + glm("f", [("s", CODE), ("i", "4"), ("o", '{"a": [1]}')])
     + "\n" + glm("now", []) + "\nDone."),
    *MALFORMED[:3], *MALFORMED[9:12],
    (Qwen3CoderToolParser, "a <tool_call b <tool_cal"),
    (Glm45ToolParser, "<tool_call><tool_call>now</tool_call> <"),
]


@pytest.mark.parametrize(("cls", "text"), TEXTS)
def test_every_split_streams_the_whole_result(cls, text):
    whole = _stream(cls, text, [])
    for cut in range(len(text) + 1):
        assert _stream(cls, text, [cut]) == whole
    assert _stream(cls, text, list(range(len(text)))) == whole


def test_streamed_text_and_calls():
    cls, text = TEXTS[0]
    content, calls = _stream(cls, text, list(range(len(text))))
    assert content == "Let me look.\n\nDone."
    assert [(n, json.loads(a)) for n, a in calls] == [("f", {"s": CODE, "i": 4, "o": {"a": [1]}}), ("now", {})]


def test_chat_plan_gives_the_parser_the_requests_tools(monkeypatch):
    """The parser ChatPlan builds types values by the request's tools; parsers that take no tools
    (pythonic) are built as before."""
    monkeypatch.setitem(TOOL_PARSERS, "qwen3_coder", Qwen3CoderToolParser)
    tools = [t.to_openai() for t in TOOLS]
    seq = SimpleNamespace(text=qwen("get_weather", [("city", "Paris"), ("days", "3")]), finished=True)
    for name, text, expected in [("qwen3_coder", seq.text, PARIS), ("pythonic", "[now()]", ("now", {}))]:
        plan = ChatPlan(ChatParsers(tool_call_parser=name, enable_auto_tool_choice=True), [], tools=tools)
        message = plan.output(SimpleNamespace(text=text, finished=True), tokenizer=None).message()
        assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [expected]


MARKUP = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "<arg_key>",
          "</arg_key>", "<arg_value>", "</arg_value>", "f", "s", "i", "o", "null", "[1, 'x']", "{", "<", ">", "\n", " "]


@pytest.mark.parametrize(("cls", "render"), [(Qwen3CoderToolParser, qwen), (Glm45ToolParser, glm)])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_split_of_any_markup_streams_the_whole_result(cls, render, data):
    """Random prose, markup and calls (whole or cut short): no exception, and any split agrees."""
    pieces = data.draw(st.lists(st.one_of(
        st.sampled_from(MARKUP), st.text(alphabet="ab<>/=_\n", max_size=6),
        st.builds(render, st.sampled_from(["f", "now", "g"]), st.lists(st.tuples(
            st.sampled_from(["s", "i", "o", "zz"]), st.sampled_from(["x", "3", "null", "{'a': 1}", "a\nb"])),
            max_size=2))), max_size=6))
    text = "".join(pieces)
    cut = data.draw(st.integers(0, len(text)))
    text = text[:cut] if data.draw(st.booleans()) else text
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=10))))
    assert _stream(cls, text, cuts) == _stream(cls, text, [])
