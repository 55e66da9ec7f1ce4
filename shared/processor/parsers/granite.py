"""granite: IBM Granite 3.x tool calls. The output is a JSON list of call objects from its start,
after ``<|tool_call|>`` (a special token) or the plain string ``<tool_call>`` (vLLM strips
either, or both in that order; the list alone is accepted too):

    <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

An output that does not start so is content, as is the text after the list (vLLM drops a
message whose list is followed by text back to content whole; here the calls stand).
"""

from __future__ import annotations

from shared.processor.parsers.json_list import list_calls
from shared.processor.parsers.scan import could_become, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser

TOKEN, STRING = "<|tool_call|>", "<tool_call>"


class GraniteToolParser(ToolParser):
    name = "granite"
    special_markers = (TOKEN,)
    # Per-output state, set on the instance (a class default, so the base constructor is kept as is).
    _done = False  # past the list (or past finding there is none): content from here on

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        if self._done:
            return [text], len(text)
        pos = skip_space(text, 0)
        for marker in (TOKEN, STRING):
            if text.startswith(marker, pos):
                pos = skip_space(text, pos + len(marker))
            elif could_become(text[pos:], marker) and not final:
                return [], 0
        if pos == len(text) and not final:
            return [], 0
        step = list_calls(text, pos, final, self._brackets) if text[pos:pos + 1] == "[" else (None, pos)
        if step is None:
            return [], 0
        calls, end = step
        self._done = True
        return ([*calls, text[end:]] if calls else [text]), len(text)
