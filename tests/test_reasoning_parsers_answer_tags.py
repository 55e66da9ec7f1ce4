"""Reasoning parsers whose answer sits inside a second tag pair (vLLM's ernie45 and hunyuan_a13b),
chained with tool parsing: random outputs streamed at random splits give the whole result (a tag
never shows in a delta), and tool calls are read inside the answer. Their documented formats and
token counts are in test_reasoning_parsers_families."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.processor.parsers import get_reasoning_parser, get_tool_parser
from shared.processor.parsers.output import OutputParser
from shared.processor.parsers.types import ParsedMessage

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

