"""Reasoning parsers whose answer sits inside a second tag pair (vLLM's ernie45 and hunyuan_a13b):
each documented format split into reasoning and content with the answer's tags dropped, the same
streamed at every split point and one character at a time (a tag never shows in a delta), chained
with tool parsing, and reasoning tokens counted on a small fake tokenization."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.processor.parsers import REASONING_PARSERS, get_reasoning_parser, get_tool_parser
from shared.processor.parsers.output import OutputParser
from shared.processor.parsers.types import ParsedMessage

ERNIE = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # the template opens the block
HY_CALL = '<tool_calls>[{"name": "f", "arguments": {"x": 1}}]</tool_calls>'

CASES = [
    # ernie45: starts inside the reasoning; the answer is inside <response>...</response>, newlines kept
    ("ernie45", ERNIE, "abc\n</think>\n\n<response>\ndef\n</response>\n", ("abc\n", "\ndef\n")),
    ("ernie45", None, "<think>abc</think><response>def</response>", ("abc", "def")),
    ("ernie45", ERNIE, "abc\n</think>\ndef", ("abc\n", "\ndef")),  # no response tags: content as written
    ("ernie45", ERNIE, "abc</think>\n\n<tool_call>\n{}\n</tool_call>", ("abc", "\n\n<tool_call>\n{}\n</tool_call>")),
    ("ernie45", ERNIE, "cut short by max_tokens", ("cut short by max_tokens", None)),
    ("ernie45", ERNIE, "abc</think>\n\n<response>\ncut short", ("abc", "\ncut short")),
    ("ernie45", ERNIE, "abc</think>\n\n<response>\n", ("abc", "\n")),
    ("ernie45", ERNIE, "abc</think>\n\n", ("abc", "\n\n")),  # whitespace alone stays content
    ("ernie45", ERNIE, "abc</think>", ("abc", None)),
    ("ernie45", ERNIE, "</think><response>def</response>", (None, "def")),
    ("ernie45", ERNIE, "a</think><response>x</response>\n\nmore", ("a", "x\n\nmore")),  # text after the end tag
    ("ernie45", ERNIE, "a</think>so <response>x</response>", ("a", "so <response>x</response>")),
    ("ernie45", ERNIE, "a</think><response>x <response> y", ("a", "x <response> y")),
    # hunyuan_a13b: the model writes the blocks; the newline just inside each tag goes with the tag
    ("hunyuan_a13b", None, "<think>\nLet me see.\n</think>\n<answer>\nIt is 4.\n</answer>", ("Let me see.", "It is 4.")),
    ("hunyuan_a13b", None, "<think>\n\n</think>\n<answer>\nIt is 4.\n</answer>", (None, "It is 4.")),  # /no_think
    ("hunyuan_a13b", None, "<think>\nThis\nThat\n</think>\n<answer>\nrest\nThat", ("This\nThat", "rest\nThat")),
    ("hunyuan_a13b", None, "<think>\nA section!\n</think>\n<answer>\n", ("A section!", None)),
    ("hunyuan_a13b", None, "<think>R</think><answer>A</answer>", ("R", "A")),
    ("hunyuan_a13b", None, f"<think>\nR\n</think>\n<answer>\n{HY_CALL}\n</answer>", ("R", HY_CALL)),
    ("hunyuan_a13b", None, "This is content", (None, "This is content")),
    ("hunyuan_a13b", None, "<answer>\nIt is 4.\n</answer>", (None, "It is 4.")),  # no reasoning, still an answer
    ("hunyuan_a13b", None, "<think>\ncut short", ("cut short", None)),
    ("hunyuan_a13b", None, "<think>\nR\n</think>\nno tags", ("R", "\nno tags")),
    ("hunyuan_a13b", None, "<think>\nR\n</think>\n<answer>\nA\n</answer>\n", ("R", "A")),
    ("hunyuan_a13b", None, "<think>\nR\n</think>\n<answer>\nA\n</answer>\nafter", ("R", "A\nafter")),
    ("hunyuan_a13b", None, "It <think>x</think>", (None, "It <think>x</think>")),
]


def test_names_are_registered():
    assert {"ernie45", "hunyuan_a13b"} <= set(REASONING_PARSERS)


@pytest.mark.parametrize(("name", "prompt", "text", "expected"), CASES)
def test_documented_outputs(name, prompt, text, expected):
    m = get_reasoning_parser(name)(prompt).extract(text)
    assert (m.reasoning_content, m.content) == expected


def _streamed(name: str, prompt: str | None, pieces: list[str]) -> ParsedMessage:
    parser, deltas = get_reasoning_parser(name)(prompt), []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    assert all(d.content or d.reasoning_content for d in deltas)
    return ParsedMessage.from_deltas(deltas)


@pytest.mark.parametrize(("name", "prompt", "text", "expected"), CASES)
def test_every_split_streams_the_whole_result(name, prompt, text, expected):
    for cut in range(len(text) + 1):
        m = _streamed(name, prompt, [text[:cut], text[cut:]])
        assert (m.reasoning_content, m.content) == expected, cut
    m = _streamed(name, prompt, list(text))
    assert (m.reasoning_content, m.content) == expected


PIECES = ["<think>", "</think>", "<response>", "</response>", "<answer>", "</answer>", "<ans", "</resp",
          "\n", " ", "a", "<", "/", ">", "é", "<tool_call>{\"name\": \"f\"}</tool_call>"]


@pytest.mark.parametrize("name", ["ernie45", "hunyuan_a13b"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_split_streams_the_whole_result(name, data):
    text = "".join(data.draw(st.lists(st.sampled_from(PIECES), max_size=12)))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))) + [len(text)]
    with_tools = data.draw(st.booleans())

    def parser() -> OutputParser:
        return OutputParser(get_reasoning_parser(name)(), get_tool_parser("hermes")() if with_tools else None)

    streamer, deltas, last = parser(), [], 0
    for cut in cuts:
        deltas += streamer.feed(text[last:cut])
        last = cut
    deltas += streamer.finish()
    streamed, whole = ParsedMessage.from_deltas(deltas), parser().extract(text)
    assert (streamed.content, streamed.reasoning_content) == (whole.content, whole.reasoning_content)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_tool_calls_are_read_inside_the_answer():
    text = '<think>\nI will call f.\n</think>\n<answer>\n<tool_call>{"name": "f", "arguments": {"x": 1}}' \
           '</tool_call>\n</answer>'
    parser = OutputParser(get_reasoning_parser("hunyuan_a13b")(), get_tool_parser("hermes")())
    message = parser.extract(text)
    assert message.reasoning_content == "I will call f." and message.content is None and parser.called
    assert [(c.name, c.arguments) for c in message.tool_calls] == [("f", '{"x": 1}')]


def _fake(pieces: list[str]) -> tuple[list[int], object]:
    """Token i is pieces[i]; decoding joins them."""
    return list(range(len(pieces))), lambda ids: "".join(pieces[i] for i in ids)


@pytest.mark.parametrize(("name", "prompt", "pieces", "expected"), [
    ("ernie45", ERNIE, ["a", "b", "\n", "</think>", "\n\n", "<response>", "\n", "c", "</response>"], 3),
    ("ernie45", ERNIE, ["a", "b", "c"], 3),  # never closed: all reasoning
    ("ernie45", None, ["<think>", "a", "</think>", "<response>", "c", "</response>"], 1),
    # "<think>" and "\n" are the start marker; "\n" before "</think>" is the end marker's leading token
    ("hunyuan_a13b", None, ["<think>", "\n", "a", "b", "\n", "</think>", "\n", "<answer>", "\n", "c",
                            "\n", "</answer>"], 3),
    # /no_think: one "\n\n" token ends the start marker and begins the end one, an empty block
    ("hunyuan_a13b", None, ["<think>", "\n\n", "</think>", "\n", "<answer>", "\n", "c"], 0),
    ("hunyuan_a13b", None, ["<think>", "\n", "a", "b"], 2),
    ("hunyuan_a13b", None, ["<answer>", "\n", "c", "\n", "</answer>"], 0),
    ("hunyuan_a13b", None, ["It", " is", " 4"], 0),
])
def test_reasoning_tokens_counted(name, prompt, pieces, expected):
    ids, decode = _fake(pieces)
    assert get_reasoning_parser(name)(prompt).count_reasoning_tokens(ids, decode) == expected
