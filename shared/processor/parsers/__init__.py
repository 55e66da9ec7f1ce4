"""Tool-call and reasoning parsers (vLLM's names), tool request checks, and the schema that
forces calls for tool_choice "required" or named. Parsers are torch-free and made per output:

    parser = get_tool_parser("hermes")()          # one per choice
    parser.feed(text_delta) -> [DeltaMessage]     # streaming; then parser.finish()
    get_tool_parser("hermes").extract(text)       # whole: ParsedMessage(content, tool_calls)

See output.OutputParser for reasoning and tool parsing chained, as chat completions use them.
"""

from __future__ import annotations

from shared.processor.errors import InvalidRequest
from shared.processor.parsers.hermes import HermesToolParser
from shared.processor.parsers.llama3_json import Llama3JsonToolParser
from shared.processor.parsers.mistral import MistralToolParser
from shared.processor.parsers.pythonic import PythonicToolParser
from shared.processor.parsers.reasoning import REASONING_PARSERS, ReasoningParser
from shared.processor.parsers.tool_parser import ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The tool parser class registered as name; InvalidRequest listing the names otherwise."""
    if name not in TOOL_PARSERS:
        raise InvalidRequest(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}",
                             "tool_call_parser")
    return TOOL_PARSERS[name]


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class registered as name; InvalidRequest listing the names otherwise."""
    if name not in REASONING_PARSERS:
        raise InvalidRequest(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}",
                             "reasoning_parser")
    return REASONING_PARSERS[name]
