"""deepseek_v3 and deepseek_v31: DeepSeek tool calls, in a section of calls between special tokens
(the bars are fullwidth ``｜``, the spaces ``▁``). DeepSeek-V3 and R1-0528 write each call's type,
name and a fenced JSON block; DeepSeek-V3.1 writes the name and the JSON alone:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Text outside the section is content; see sections for what stays content inside one.
"""

from __future__ import annotations

import re

from shared.processor.parsers.sections import SectionToolParser, arguments
from shared.processor.parsers.types import ToolCall

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_V3_HEAD = re.compile(rf"\s*function{re.escape(SEP)}({_NAME.pattern})\s*```json")


class DeepSeekV3ToolParser(SectionToolParser):
    name = "deepseek_v3"
    section = (CALLS_BEGIN, CALLS_END)
    call = (CALL_BEGIN, CALL_END)
    special_markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

    def _parse(self, body: str) -> ToolCall | None:
        head = _V3_HEAD.match(body)
        fenced = body[head.end():].rstrip() if head else ""
        args = arguments(fenced[:-3]) if fenced.endswith("```") else None
        return ToolCall(head.group(1), args) if head and args is not None else None


class DeepSeekV31ToolParser(DeepSeekV3ToolParser):
    name = "deepseek_v31"

    def _parse(self, body: str) -> ToolCall | None:
        name, sep, args = body.partition(SEP)
        name, args = name.strip(), arguments(args) if sep else None
        return ToolCall(name, args) if _NAME.fullmatch(name) and args is not None else None
