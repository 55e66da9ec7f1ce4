"""make_test_model's chat templates render a tool conversation through transformers'
apply_chat_template as Qwen's (hermes) and Llama 3.1's templates do, and what they render as an
assistant's calls reads back through the matching tool parser."""

from __future__ import annotations

import json

import pytest

from pagedserve.test_model import make_test_model
from shared.processor.parsers import get_reasoning_parser, get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    out = {}
    for chat_format in ("qwen", "llama3"):
        path = make_test_model(tmp_path_factory.mktemp(chat_format), "llama", "tiny", chat_format=chat_format)
        out[chat_format] = (AutoTokenizer.from_pretrained(path), json.loads((path / "generation_config.json").read_text()))
    return out


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def test_qwen_template_renders_tools_calls_and_results(tokenizers):
    tokenizer, generation = tokenizers["qwen"]
    text = _render(tokenizer, CONVERSATION, tools=TOOLS)
    system, user, assistant, results, prompt = text.split("<|im_start|>")[1:]
    assert system.startswith("system\nBe brief.\n\n# Tools\n") and "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in system
    assert user == "user\nWeather in Paris and Rome?<|im_end|>\n"
    assert assistant == ('assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')
    assert results == "user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response><|im_end|>\n"
    assert prompt == "assistant\n"
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    calls = get_tool_parser("hermes").extract(assistant.removeprefix("assistant\n").removesuffix("<|im_end|>\n"))
    assert [(c.name, json.loads(c.arguments)) for c in calls.tool_calls] == [("get_weather", {"city": "Paris"}),
                                                                             ("get_weather", {"city": "Rome"})]


def test_qwen_template_without_tools_is_plain_chatml(tokenizers):
    tokenizer, _ = tokenizers["qwen"]
    messages = CONVERSATION[:2]
    assert _render(tokenizer, messages) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                            "Weather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\n")
    assert _render(tokenizer, messages, tools=None) == _render(tokenizer, messages)


@pytest.mark.parametrize(("thinking", "suffix", "reasoning"), [
    (True, "<think>\n", ("all of it", None)), (False, "<think>\n\n</think>\n\n", (None, "all of it"))])
def test_enable_thinking_reaches_the_template(tokenizers, thinking, suffix, reasoning):
    """chat_template_kwargs' enable_thinking opens or closes the think block, which decides how
    the qwen3 reasoning parser reads the output."""
    tokenizer, _ = tokenizers["qwen"]
    prompt = _render(tokenizer, CONVERSATION[1:2], enable_thinking=thinking)
    assert prompt.endswith("<|im_start|>assistant\n" + suffix)
    parsed = get_reasoning_parser("qwen3")(prompt).extract("all of it")
    assert (parsed.reasoning_content, parsed.content) == reasoning


def test_llama3_template_renders_tools_calls_and_results(tokenizers):
    tokenizer, generation = tokenizers["llama3"]
    text = _render(tokenizer, CONVERSATION, tools=TOOLS)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>")
    turns = text.split("<|start_header_id|>")[2:]
    assert turns[0].startswith("user<|end_header_id|>\n\n") and json.dumps(TOOLS[0], indent=4) in turns[0]
    assert turns[0].endswith("\n\nWeather in Paris and Rome?<|eot_id|>")
    assert turns[1:] == [('assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                         '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>'),
                         "ipython<|end_header_id|>\n\n18C<|eot_id|>", "ipython<|end_header_id|>\n\n24C<|eot_id|>",
                         "assistant<|end_header_id|>\n\n"]
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|eot_id|>", "<|eom_id|>")]
    assert generation["eos_token_id"] == eos
    for marker in ("<|start_header_id|>", "<|eot_id|>", "<|python_tag|>"):  # each one special token
        assert tokenizer.encode(marker, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(marker)]
    body = turns[1].removeprefix("assistant<|end_header_id|>\n\n").removesuffix("<|eot_id|>")
    calls = get_tool_parser("llama3_json").extract(body)
    assert calls.content is None and [json.loads(c.arguments) for c in calls.tool_calls] == [{"city": "Paris"},
                                                                                             {"city": "Rome"}]


def test_unknown_chat_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="chat_format"):
        make_test_model(tmp_path, chat_format="gemma")


def test_the_command_writes_the_chosen_chat_format(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pagedserve.cli", "make-test-model", str(tmp_path / "m"), "--chat-format", "llama3"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert "<|start_header_id|>" in (tmp_path / "m" / "chat_template.jinja").read_text()
