"""Reasoning parsers: <think> outputs split into reasoning and content as each family writes
them, the same streamed at any split, chained with tool parsing, and reasoning tokens counted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.processor.parsers import REASONING_PARSERS, get_reasoning_parser, get_tool_parser
from shared.processor.parsers.output import OutputParser
from shared.processor.parsers.types import ParsedMessage

QWEN_OPEN = "<|im_start|>assistant\n<think>\n"  # Qwen3-Thinking-2507: the template opens the block
QWEN_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3, enable_thinking false
R1_PROMPT = "<｜User｜>hi<｜Assistant｜><think>\n"


def _parse(name: str, text: str, prompt: str | None = None) -> tuple:
    m = get_reasoning_parser(name)(prompt).extract(text)
    return m.reasoning_content, m.content


@pytest.mark.parametrize(("name", "prompt", "text", "expected"), [
    ("qwen3", None, "<think>\nLet me see.\n</think>\n\nIt is 4.", ("\nLet me see.\n", "\n\nIt is 4.")),
    ("qwen3", None, "It is 4.", (None, "It is 4.")),  # thinking off: no tags at all
    ("qwen3", QWEN_OFF, "It is 4.", (None, "It is 4.")),
    ("qwen3", QWEN_OPEN, "Let me see.\n</think>\n\nIt is 4.", ("Let me see.\n", "\n\nIt is 4.")),
    ("qwen3", None, "The tag </think> is literal here.", (None, "The tag </think> is literal here.")),
    ("qwen3", None, "<think>cut short by max_tokens", ("cut short by max_tokens", None)),
    ("qwen3", None, " <think>x</think>", (None, " <think>x</think>")),  # a tag not at the start is text
    ("deepseek_r1", R1_PROMPT, "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_r1", None, "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_r1", None, "No closing tag yet", ("No closing tag yet", None)),
    ("deepseek_r1", None, "</think>Only content.", (None, "Only content.")),
])
def test_documented_outputs(name, prompt, text, expected):
    assert _parse(name, text, prompt) == expected


def test_unknown_parser_lists_names():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("r1")


PIECES = ["<think>", "</think>", "<th", "</thi", "<", "/", ">", "think", "a", " ", "\n", "é",
          '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', "<tool_call>", "</tool_call>"]


@pytest.mark.parametrize("name", list(REASONING_PARSERS))
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_split_streams_the_whole_result(name, data):
    text = "".join(data.draw(st.lists(st.sampled_from(PIECES), max_size=10)))
    prompt = data.draw(st.sampled_from([None, QWEN_OPEN, QWEN_OFF]))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))) + [len(text)]
    with_tools = data.draw(st.booleans())
    make = get_reasoning_parser(name)

    def parser() -> OutputParser:
        return OutputParser(make(prompt), get_tool_parser("hermes")() if with_tools else None)

    streamer, deltas, last = parser(), [], 0
    for cut in cuts:
        deltas += streamer.feed(text[last:cut])
        last = cut
    deltas += streamer.finish()
    assert all(d.content or d.reasoning_content or d.tool_calls for d in deltas)
    streamed, whole = ParsedMessage.from_deltas(deltas), parser().extract(text)
    assert (streamed.content, streamed.reasoning_content) == (whole.content, whole.reasoning_content)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_tool_calls_are_read_after_the_reasoning():
    text = '<think>I could write <tool_call>{"name": "g"}</tool_call> here</think>\n\n' \
           '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    parser = OutputParser(get_reasoning_parser("qwen3")(), get_tool_parser("hermes")())
    message = parser.extract(text)
    assert message.reasoning_content == 'I could write <tool_call>{"name": "g"}</tool_call> here'
    assert message.content is None and parser.called
    assert [(c.name, c.arguments) for c in message.tool_calls] == [("f", '{"x": 1}')]


@pytest.fixture(scope="module")
def tokenizer():
    """The test checkpoints' byte-level BPE, with <think> and </think> as single added tokens
    (as in Qwen3's tokenizer) or not."""
    from tokenizers import AddedToken, Tokenizer

    from pagedserve.test_model import _tokenizer_json

    plain = Tokenizer.from_str(_tokenizer_json(1024))
    tagged = Tokenizer.from_str(_tokenizer_json(1024))
    tagged.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return {"plain": plain, "tagged": tagged}


@pytest.mark.parametrize("kind", ["plain", "tagged"])
def test_reasoning_tokens_counted_from_token_ids(tokenizer, kind):
    tok = tokenizer[kind]
    reasoning, content = "Two and two make four, surely.", "\n\nThe answer is 4."
    ids = tok.encode("<think>" + reasoning + "</think>" + content).ids
    decode = tok.decode
    between = len(tok.encode(reasoning).ids)
    count = get_reasoning_parser("qwen3")().count_reasoning_tokens(ids, decode)
    if kind == "tagged":  # single-token tags: exactly the tokens between them
        assert ids[0] == tok.token_to_id("<think>") and tok.token_to_id("</think>") in ids
        assert count == between
    else:  # multi-token tags: the close tag's leading tokens count as reasoning
        assert between <= count < between + len(tok.encode("</think>").ids)
    assert get_reasoning_parser("qwen3")().count_reasoning_tokens(tok.encode(content).ids, decode) == 0
    unclosed = tok.encode(reasoning).ids
    assert get_reasoning_parser("deepseek_r1")().count_reasoning_tokens(unclosed, decode) == len(unclosed)
    assert get_reasoning_parser("deepseek_r1")().count_reasoning_tokens([], decode) == 0
