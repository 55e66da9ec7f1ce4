"""Reasoning parsers of more families (vLLM's names; ernie45 and hunyuan_a13b also drop the tags
around the answer): each documented format split into reasoning and content whole, the same
streamed at every split point and one character at a time, and reasoning tokens counted on a
small fake tokenization."""

from __future__ import annotations

import pytest

from shared.processor.parsers import REASONING_PARSERS, get_reasoning_parser
from shared.processor.parsers.types import ParsedMessage

V3_THINK = "<｜User｜>hi<｜Assistant｜><think>"  # DeepSeek-V3.1, thinking true
V3_OFF = "<｜User｜>hi<｜Assistant｜></think>"  # its default
GLM_OFF = "<|user|>\nhi<|assistant|>\n<think></think>"  # GLM-4.5, enable_thinking false
GLM47 = "<|user|>\nhi<|assistant|><think>"  # GLM-4.7 opens the block in the prompt
M2 = "]~b]user\nhi[e~[\n]~b]ai\n<think>\n"  # MiniMax-M2, always
SEED_OFF = ("<seed:bos>assistant\n<seed:think>\n<seed:cot_budget_reflect>The current thinking budget is 0, so I "
            "will directly start answering the question.</seed:cot_budget_reflect>\n</seed:think>")
SEED_OPEN = "<seed:bos>assistant\n<seed:think>"
REFLECT = "<seed:cot_budget_reflect>I have used 129 tokens.</seed:cot_budget_reflect>"  # stays in the reasoning
MAGISTRAL = "[SYSTEM_PROMPT]Think first.[/SYSTEM_PROMPT][INST]hi[/INST]"

ERNIE = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # the template opens the block
HY_CALL = '<tool_calls>[{"name": "f", "arguments": {"x": 1}}]</tool_calls>'

ANSWER_TAG_CASES = [  # the answer also inside a tag pair, dropped
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

CASES = [
    # mistral (Magistral): the model writes [THINK] itself
    ("mistral", MAGISTRAL, "[THINK]Let me see.[/THINK]It is 4.", ("Let me see.", "It is 4.")),
    ("mistral", MAGISTRAL, "It is 4.", (None, "It is 4.")),
    ("mistral", MAGISTRAL, "[THINK]cut short by max_tokens", ("cut short by max_tokens", None)),
    ("mistral", MAGISTRAL + "[THINK]", "Let me see.[/THINK]It is 4.", ("Let me see.", "It is 4.")),
    ("mistral", None, "The tag [/THINK] is literal here.", (None, "The tag [/THINK] is literal here.")),
    ("mistral", None, "<think>x</think>y", (None, "<think>x</think>y")),
    # glm45: <think> after the template's newline; an empty block in the prompt turns it off
    ("glm45", None, "\n<think>Let me see.</think>\nIt is 4.", ("Let me see.", "\nIt is 4.")),
    ("glm45", None, "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("glm45", GLM_OFF, "\nIt is 4.", (None, "\nIt is 4.")),
    ("glm45", GLM47, "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("glm45", None, "\n<think>cut short", ("cut short", None)),
    ("glm45", None, "\n \n", (None, "\n \n")),
    ("glm45", None, "It <think>x</think>", (None, "It <think>x</think>")),
    # seed_oss: <seed:think> written by the model; thinking_budget 0 closes a block in the prompt
    ("seed_oss", None, "<seed:think>\nLet me see.\n</seed:think>\nIt is 4.", ("\nLet me see.\n", "\nIt is 4.")),
    ("seed_oss", None, f"<seed:think>a{REFLECT}b</seed:think>c", (f"a{REFLECT}b", "c")),
    ("seed_oss", SEED_OFF, "It is 4.", (None, "It is 4.")),
    ("seed_oss", SEED_OPEN, "Let me see.</seed:think>It is 4.", ("Let me see.", "It is 4.")),
    ("seed_oss", None, "<seed:think>cut short", ("cut short", None)),
    ("seed_oss", None, "<think>x</think>y", (None, "<think>x</think>y")),
    # granite: plain-text markers, "Here is" or "Here's", at the start of the output
    ("granite", None, "Here is my thought process:\nTwo and two.\nHere is my response:\nIt is 4.",
     ("\nTwo and two.\n", "\nIt is 4.")),
    ("granite", None, "Here's my thought process: a Here's my response: b", (" a ", " b")),
    ("granite", None, "Here is my thought process: a Here's my response: b", (" a ", " b")),
    ("granite", None, "Here's my thought process: a Here is my response:", (" a ", None)),
    ("granite", None, "It is 4.", (None, "It is 4.")),
    ("granite", None, "Here is my answer: 4.", (None, "Here is my answer: 4.")),
    ("granite", None, "Here is my thought process: still going", (" still going", None)),
    ("granite", None, "So. Here is my thought process: x", (None, "So. Here is my thought process: x")),
    # deepseek_v3 (V3.1): reasoning only when the template opened it
    ("deepseek_v3", V3_THINK, "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_v3", V3_THINK, "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_v3", V3_THINK, "cut short", ("cut short", None)),
    ("deepseek_v3", V3_OFF, "It is 4.", (None, "It is 4.")),
    ("deepseek_v3", V3_OFF, "<think>x</think>y", (None, "<think>x</think>y")),
    ("deepseek_v3", None, "<think>x</think>y", (None, "<think>x</think>y")),
    # minimax_m2: the template always opens <think>, so the output starts inside
    ("minimax_m2", M2, "Let me see.\n</think>\n\nIt is 4.", ("Let me see.\n", "\n\nIt is 4.")),
    ("minimax_m2", None, "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("minimax_m2", M2, "cut short", ("cut short", None)),
    ("minimax_m2", M2, "</think>It is 4.", (None, "It is 4.")),
]


def test_names_are_registered():
    assert {"deepseek_v3", "glm45", "granite", "minimax_m2", "mistral", "seed_oss", "ernie45",
            "hunyuan_a13b"} <= set(REASONING_PARSERS)


@pytest.mark.parametrize(("name", "prompt", "text", "expected"), CASES + ANSWER_TAG_CASES)
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


@pytest.mark.parametrize(("name", "prompt", "text", "expected"), CASES + ANSWER_TAG_CASES)
def test_every_split_streams_the_whole_result(name, prompt, text, expected):
    for cut in range(len(text) + 1):
        m = _streamed(name, prompt, [text[:cut], text[cut:]])
        assert (m.reasoning_content, m.content) == expected, cut
    m = _streamed(name, prompt, list(text))
    assert (m.reasoning_content, m.content) == expected


def _fake(pieces: list[str]) -> tuple[list[int], object]:
    """Token i is pieces[i]; decoding joins them."""
    return list(range(len(pieces))), lambda ids: "".join(pieces[i] for i in ids)


@pytest.mark.parametrize(("name", "prompt", "pieces", "expected"), [
    ("mistral", None, ["[THINK]", "Two", " and", " two", "[/THINK]", "Four", "."], 3),
    ("mistral", None, ["Four", "."], 0),
    ("seed_oss", None, ["<seed:think>", "a", "b", "</seed:think>", "c"], 2),
    ("seed_oss", SEED_OFF, ["a", "b"], 0),
    ("glm45", None, ["\n", "<think>", "a", "b", "</think>", "\n", "c"], 2),
    ("glm45", GLM47, ["a", "b", "c", "</think>", "d"], 3),
    ("deepseek_v3", V3_THINK, ["a", "b", "</think>", "c"], 2),
    ("deepseek_v3", V3_OFF, ["<think>", "a", "</think>", "c"], 0),
    ("minimax_m2", M2, ["a", "b", "c"], 3),  # never closed: all reasoning
    # multi-token markers: tokens through the start marker are not counted; the end marker's
    # leading tokens (" Here", "'s", " my", " response") are, as for a split </think>
    ("granite", None, ["Here", " is", " my", " thought", " process", ":", " a", " b",
                       " Here", "'s", " my", " response", ":", " c"], 2 + 4),
    ("granite", None, ["Here", " is", " my", " answer"], 0),
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


@pytest.mark.parametrize(("reasoning", "tool", "keeps_special_tokens"), [
    ("mistral", None, True),  # [THINK] / [/THINK] are special tokens: decoded only if kept
    ("qwen3", None, False),
    ("qwen3", "mistral", True),  # the tool parser's [TOOL_CALLS] needs them kept too
])
def test_special_token_markers_are_kept_in_the_text(reasoning, tool, keeps_special_tokens):
    from shared.processor.chat import ChatParsers, ChatPlan
    from shared.sampling_params import SamplingParams

    parsers = ChatParsers(tool, reasoning, enable_auto_tool_choice=tool is not None)
    tools = [{"type": "function", "function": {"name": "f"}}] if tool else None
    plan = ChatPlan(parsers, [{"role": "user", "content": "hi"}], tools, "auto" if tool else None)
    assert plan.sampling_params(SamplingParams()).skip_special_tokens is not keeps_special_tokens
