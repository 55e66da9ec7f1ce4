"""Tool-call and reasoning parsers (vLLM's names), tool request checks, and the schema that
forces calls for tool_choice "required" or named. Parsers are torch-free and made per output:

    parser = get_tool_parser("hermes")()          # one per choice
    parser.feed(text_delta) -> [DeltaMessage]     # streaming; then parser.finish()
    get_tool_parser("hermes").extract(text)       # whole: ParsedMessage(content, tool_calls)

See output.OutputParser for reasoning and tool parsing chained, as chat completions use them;
validation for the tool request checks; forced for tool_choice "required" or named.
"""

from __future__ import annotations

from shared.processor.errors import InvalidRequest
from shared.processor.parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from shared.processor.parsers.forced import ForcedCallsParser, forced_calls_schema
from shared.processor.parsers.glm45 import Glm45ToolParser
from shared.processor.parsers.granite import GraniteToolParser
from shared.processor.parsers.hermes import HermesToolParser
from shared.processor.parsers.internlm import InternLMToolParser
from shared.processor.parsers.jamba import JambaToolParser
from shared.processor.parsers.kimi_k2 import KimiK2ToolParser
from shared.processor.parsers.llama3_json import Llama3JsonToolParser
from shared.processor.parsers.mistral import MistralToolParser
from shared.processor.parsers.output import OutputParser
from shared.processor.parsers.phi4_mini import Phi4MiniJsonToolParser
from shared.processor.parsers.pythonic import PythonicToolParser
from shared.processor.parsers.qwen3_coder import Qwen3CoderToolParser
from shared.processor.parsers.reasoning import REASONING_PARSERS, ReasoningParser
from shared.processor.parsers.tool_parser import ToolParser
from shared.processor.parsers.types import DeltaMessage, ParsedMessage, ToolCall
from shared.processor.parsers.validation import Tool, check_tool_choice, check_tool_messages, check_tools
from shared.processor.parsers.xlam import XLAMToolParser

__all__ = [
    "REASONING_PARSERS", "TOOL_PARSERS", "DeltaMessage", "ForcedCallsParser", "OutputParser", "ParsedMessage",
    "ReasoningParser", "Tool", "ToolCall", "ToolParser", "check_tool_choice", "check_tool_messages", "check_tools",
    "forced_calls_schema", "get_reasoning_parser", "get_tool_parser",
]

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (
        HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser, Qwen3CoderToolParser,
        Glm45ToolParser, DeepSeekV3ToolParser, DeepSeekV31ToolParser, KimiK2ToolParser, GraniteToolParser,
        InternLMToolParser, JambaToolParser, Phi4MiniJsonToolParser, XLAMToolParser,
    )
}
# vLLM's other names for the same formats
TOOL_PARSERS |= {"llama4_json": Llama3JsonToolParser, "llama4_pythonic": PythonicToolParser,
                 "qwen3_xml": Qwen3CoderToolParser}


def _lookup(registry: dict, name: str, what: str, param: str):
    if name not in registry:
        raise InvalidRequest(f"unknown {what} {name!r}; choose one of {', '.join(registry)}", param)
    return registry[name]


def get_tool_parser(name: str) -> type[ToolParser]:
    """The tool parser class registered as name; InvalidRequest listing the names otherwise."""
    return _lookup(TOOL_PARSERS, name, "tool call parser", "tool_call_parser")


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class registered as name; InvalidRequest listing the names otherwise."""
    return _lookup(REASONING_PARSERS, name, "reasoning parser", "reasoning_parser")
