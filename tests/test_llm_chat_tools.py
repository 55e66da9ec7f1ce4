"""LLM.chat with tools, tool_choice, chat_template_kwargs and parsers: the same shared ChatPlan
as the server, so forced calls validate, auto calls and reasoning are parsed out of the text,
and bad tool input raises ValueError naming the field before anything is admitted."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from shared.sampling_params import StructuredOutputsParams

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.fixture(scope="module")
def llm(model_dirs) -> LLM:
    return LLM(str(model_dirs("llama")), kv_cache_memory=16 << 20, max_model_len=1024)


def _forced(text: str, **kwargs) -> SamplingParams:
    """Greedy, with the output constrained to exactly ``text``."""
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 120, **kwargs},
                          structured_outputs=StructuredOutputsParams(choice=[text]))


@pytest.mark.parametrize("parallel", [None, False])
def test_required_gives_valid_calls(llm, parallel):
    (out,) = llm.chat(ASK, SamplingParams(temperature=0.0, max_tokens=120), use_tqdm=False, tools=TOOLS,
                      tool_choice="required", parallel_tool_calls=parallel)
    choice = out.outputs[0]
    assert choice.finish_reason == "tool_calls" and choice.content is None and choice.tool_calls
    for call in choice.tool_calls:
        assert call.id.startswith("call_")
        schema = WEATHER if call.name == "get_weather" else {"type": "object", "additionalProperties": False}
        jsonschema.validate(json.loads(call.arguments), schema)
    assert json.loads(choice.text)[0]["name"] == choice.tool_calls[0].name  # text stays the raw output
    if parallel is False:
        assert len(choice.tool_calls) == 1


def test_named_tool_choice_calls_it(llm):
    named = {"type": "function", "function": {"name": "now"}}
    (out,) = llm.chat(ASK, SamplingParams(temperature=0.0, max_tokens=60), use_tqdm=False, tools=TOOLS,
                      tool_choice=named)
    call = out.outputs[0].tool_calls[0]
    assert (call.name, json.loads(call.arguments)) == ("now", {})


def test_auto_parses_the_text_with_the_tool_parser(llm):
    (out,) = llm.chat(ASK, _forced("Let me see. " + CALL), use_tqdm=False, tools=TOOLS, tool_parser="hermes")
    choice = out.outputs[0]
    assert choice.finish_reason == "tool_calls" and choice.content == "Let me see. "
    assert [(c.name, json.loads(c.arguments)) for c in choice.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]


ARGS = '{"city": "Paris", "unit": "celsius"}'
# get_weather(city="Paris", unit="celsius") as each family writes it
FAMILY_CALLS = {
    "hermes": CALL,
    "llama3_json": '{"name": "get_weather", "parameters": ' + ARGS + "}",
    "pythonic": '[get_weather(city="Paris", unit="celsius")]',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + ARGS + "}]",
    "qwen3_coder": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>"),
    "glm45": ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>"),
    "deepseek_v3": ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" + ARGS
                    + "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "deepseek_v31": ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>" + ARGS
                     + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "kimi_k2": ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
                + ARGS + "<|tool_call_end|><|tool_calls_section_end|>"),
    "granite": '<|tool_call|>[{"name": "get_weather", "arguments": ' + ARGS + "}]",
    "internlm": '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": ' + ARGS + "}<|action_end|>",
    "jamba": '<tool_calls>[{"name": "get_weather", "arguments": ' + ARGS + "}]</tool_calls>",
    "phi4_mini_json": 'functools[{"name": "get_weather", "arguments": ' + ARGS + "}]",
    "xlam": '[{"name": "get_weather", "arguments": ' + ARGS + "}]",
}


@pytest.mark.parametrize("parser", list(FAMILY_CALLS))
def test_every_tool_parser_reads_its_family_through_chat(llm, parser):
    """The whole path: the template sees the tools, the model writes the family's markup (forced
    here), and LLM.chat returns the call, typed by the tool's schema where the format needs it."""
    (out,) = llm.chat(ASK, _forced(FAMILY_CALLS[parser], max_tokens=400), use_tqdm=False, tools=TOOLS,
                      tool_parser=parser)
    choice = out.outputs[0]
    assert choice.finish_reason == "tool_calls" and choice.content is None, choice.text
    assert [(c.name, json.loads(c.arguments)) for c in choice.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_reasoning_split_and_template_kwargs_reach_the_template(llm):
    tokenizer = llm.get_tokenizer()
    (think,) = llm.chat(ASK, _forced("because</think>Sunny."), use_tqdm=False, reasoning_parser="qwen3",
                        chat_template_kwargs={"enable_thinking": True})
    assert think.prompt.rstrip().endswith("<think>")  # the template opened the reasoning
    assert (think.outputs[0].reasoning_content, think.outputs[0].content) == ("because", "Sunny.")
    (plain,) = llm.chat(ASK, _forced("Sunny."), use_tqdm=False, reasoning_parser="qwen3",
                        chat_template_kwargs={"enable_thinking": False})
    assert "</think>" in plain.prompt and "<think>" in tokenizer.decode(plain.prompt_token_ids)
    assert (plain.outputs[0].reasoning_content, plain.outputs[0].content) == (None, "Sunny.")


def test_reasoning_then_tool_call(llm):
    (out,) = llm.chat(ASK, _forced("<think>need data</think>" + CALL), use_tqdm=False, tools=TOOLS,
                      tool_parser="hermes", reasoning_parser="qwen3")
    choice = out.outputs[0]
    assert choice.reasoning_content == "need data" and choice.content is None
    assert [c.name for c in choice.tool_calls] == ["get_weather"] and choice.finish_reason == "tool_calls"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": TOOLS}, "tool_choice"),  # auto without a tool parser
    ({"tool_parser": "nope"}, "hermes"),  # the message lists the parsers
    ({"reasoning_parser": "nope"}, "deepseek_r1"),
    ({"chat_template_kwargs": 5}, "chat_template_kwargs"),
])
def test_bad_tool_input_raises_value_error(llm, kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False, **kwargs)
    assert not llm.engine.has_unfinished()
    assert llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": 5}],  # the template iterates over a content that is no list or text
    [{"content": "no role"}],
])
def test_messages_the_template_cannot_render_raise_value_error(llm, messages):
    with pytest.raises(ValueError, match="The chat template could not render these messages"):
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].finish_reason == "length"
