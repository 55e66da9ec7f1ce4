"""jamba: AI21 Jamba tool calls, a JSON list of call objects between special tokens:

    <tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]</tool_calls>

Text outside the tags is content. A block that is not such a list, or that the output leaves
unclosed, stays content, tags and all.
"""

from __future__ import annotations

from shared.processor.parsers.json_list import closer_after, list_calls
from shared.processor.parsers.scan import skip_space
from shared.processor.parsers.tool_parser import MarkedToolParser, Segment

START, END = "<tool_calls>", "</tool_calls>"


class JambaToolParser(MarkedToolParser):
    name = "jamba"
    marker = START
    special_markers = (START, END)

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        pos = skip_space(text, start + len(START))
        if pos == len(text) and not final:
            return None
        if text[pos:pos + 1] != "[":
            return [text[start:pos]], pos
        step = list_calls(text, pos, final, self._brackets)
        if step is None:
            return None
        calls, end = step
        close = closer_after(text, end, END, final)
        if close is None:
            return None
        if calls is None or close < 0:
            stop = max(close, end)
            return [text[start:stop]], stop
        return calls, close
