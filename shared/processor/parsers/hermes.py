"""hermes: Hermes 2 Pro, Qwen2.5 and Qwen3 tool calls, one JSON object per call between tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is content. A tagged block that is not such an object, or a block the
output leaves unclosed, stays content, tags and all.
"""

from __future__ import annotations

from shared.processor.parsers.scan import call_from_object, json_value
from shared.processor.parsers.tool_parser import TaggedToolParser
from shared.processor.parsers.types import ToolCall

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(TaggedToolParser):
    name = "hermes"
    marker, end = START, END

    def _call_of(self, body: str) -> ToolCall | None:
        return call_from_object(json_value(body), ("arguments",))
