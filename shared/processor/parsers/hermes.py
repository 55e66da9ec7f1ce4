"""hermes: Hermes 2 Pro, Qwen2.5 and Qwen3 tool calls, one JSON object per call between tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is content. A tagged block that is not such an object, or a block the
output leaves unclosed, stays content, tags and all.
"""

from __future__ import annotations

from shared.processor.parsers.scan import call_from_object, json_value
from shared.processor.parsers.tool_parser import MarkedToolParser, Segment

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(MarkedToolParser):
    name = "hermes"
    marker = START

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        body = start + len(START)
        stop = text.find(END, body)
        if stop < 0:
            return None if not final else ([text[start:]], len(text))
        end = stop + len(END)
        call = call_from_object(json_value(text[body:stop]), ("arguments",))
        return [call or text[start:end]], end
