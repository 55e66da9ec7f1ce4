"""llama3_json: Llama 3.1+ JSON tool calls. The output is a call from its start: a JSON object
``{"name": ..., "parameters": {...}}`` (``arguments`` is accepted too), optionally after
``<|python_tag|>``, several separated by ``;``:

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

An output that does not start so is content, as is everything from the first piece that is not
a valid call (so a JSON answer that is not a call stays content).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.processor.parsers.scan import call_from_object, could_become, json_value, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser
from shared.processor.parsers.validation import Tool

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    special_markers = (TAG,)

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        super().__init__(tools)
        self._prose = False  # the output turned out to be content: everything from here on is
        self._after_call = False

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        used = 0
        while not self._prose:
            step = self._next_call(text, used, final)
            if step is None:  # wait for more text
                return segments, used
            if step[0] is None:
                self._prose = True
                break
            call, used = step  # the space, tag and separator before a call are markup
            segments.append(call)
            self._after_call = True
        segments.append(text[used:])
        return segments, len(text)

    def _next_call(self, text: str, pos: int, final: bool):
        """(call, end) for the call starting at pos; (None, pos) when the text there is not a call;
        None when more text could decide."""
        pos = skip_space(text, pos)
        if self._after_call:
            if pos == len(text):
                return (None, pos) if final else None
            if text[pos] != ";":
                return None, pos
            pos = skip_space(text, pos + 1)
        if text.startswith(TAG, pos):
            pos = skip_space(text, pos + len(TAG))
        elif could_become(text[pos:], TAG) and not final:
            return None
        if pos == len(text):
            return (None, pos) if final else None
        end = self._brackets.end(text, pos) if text[pos] == "{" else -1
        if end is None:
            return (None, pos) if final else None
        call = call_from_object(json_value(text[pos:end])) if end > 0 else None
        return (call, end) if call else (None, pos)
