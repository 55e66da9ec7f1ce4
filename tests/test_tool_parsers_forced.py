"""tool_choice "required" and named: the schema that forces calls, compiled by xgrammar with a
test checkpoint's real tokenizer, lets random token walks produce only valid calls (names among
the tools, arguments that validate against the tool's schema, one call when parallel_tool_calls
is false), which ForcedCallsParser reads back."""

from __future__ import annotations

import json
import random

import pytest

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
torch = pytest.importorskip("torch")

from shared.processor.parsers.forced import ForcedCallsParser, forced_calls_schema
from shared.processor.parsers.validation import check_tool_choice, check_tools

TOOLS = check_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {  # local $refs, rebased by the schema
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"at": {"$ref": "#/$defs/point"},
                                         "path": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                                  "maxItems": 2}},
        "required": ["at"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters
])
_SCHEMAS = {t.name: t.parameters or {"type": "object", "properties": {}, "additionalProperties": False} for t in TOOLS}


@pytest.fixture(scope="module")
def grammar_compiler():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from pagedserve.test_model import _tokenizer_json

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(1024)),
                                        eos_token="<|endoftext|>")
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=1024,
                                                   stop_token_ids=[tokenizer.eos_token_id])
    return xgrammar.GrammarCompiler(info), tokenizer


def _walk(compiled, tokenizer, rng: random.Random, steps: int = 300) -> str | None:
    """A random walk through the grammar, leaning on short structural tokens so it ends; the
    text, or None when it has not ended within steps."""
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, 1024)
    lean = [tokenizer.convert_tokens_to_ids(t) for t in ['"', "}", "]", ",", "0", "1", "{"]]
    lean.append(tokenizer.eos_token_id)
    ids: list[int] = []
    for _ in range(steps):
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.zeros(1, 1024)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
        short = [t for t in lean if t in allowed]
        token = rng.choice(short if short and rng.random() < 0.6 else allowed)
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    return None


@pytest.mark.parametrize(("choice", "parallel"), [
    ("required", True), ("required", False), ({"type": "function", "function": {"name": "lookup"}}, True),
])
def test_random_walks_yield_valid_calls(grammar_compiler, choice, parallel):
    compiler, tokenizer = grammar_compiler
    choice = check_tool_choice(choice, TOOLS, parallel)
    compiled = compiler.compile_json_schema(forced_calls_schema(TOOLS, choice, parallel), any_whitespace=False)
    rng, ended, names = random.Random(0), 0, set()
    for _ in range(40):
        text = _walk(compiled, tokenizer, rng)
        if text is None:
            continue
        ended += 1
        message = ForcedCallsParser.extract(text)
        assert message.content is None, text
        assert len(message.tool_calls) >= 1 and (parallel or len(message.tool_calls) == 1), text
        for call in message.tool_calls:
            names.add(call.name)
            jsonschema.validate(json.loads(call.arguments), _SCHEMAS[call.name])
    assert ended >= 30
    assert names == ({"lookup"} if isinstance(choice, dict) else {"get_weather", "lookup", "now"})


def test_a_number_past_a_floats_range_is_content_not_an_error():
    text = '[{"name":"now","parameters":{}},{"name":"get_weather","parameters":{"t":1e999}}]'
    message = ForcedCallsParser.extract(text)  # xgrammar's JSON grammar lets a random model write it
    assert [c.name for c in message.tool_calls] == ["now"]
    assert message.content == ',{"name":"get_weather","parameters":{"t":1e999}}]'


def test_a_cut_short_output_keeps_its_complete_calls():
    text = '[{"name":"now","parameters":{}},{"name":"get_weather","parameters":{"ci'
    message = ForcedCallsParser.extract(text)
    assert [c.name for c in message.tool_calls] == ["now"]
    assert message.content == ',{"name":"get_weather","parameters":{"ci'


def test_schema_is_json_for_structured_outputs():
    """The schema travels as SamplingParams.structured_outputs.json."""
    from shared.sampling_params import StructuredOutputsParams

    schema = forced_calls_schema(TOOLS, "required", False)
    assert StructuredOutputsParams(json=json.dumps(schema)).json == schema
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
