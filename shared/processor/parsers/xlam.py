"""xlam: Salesforce xLAM tool calls, a JSON list of call objects, in any of the places vLLM's
xlam parser looks for one:

    [{"name": "get_weather", "arguments": {"city": "Paris"}}]          the whole output (or all
                                                                       after </think>)
    ```json
    [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    ```                                                                a code block ("json" optional)
    [TOOL_CALLS][{"name": ...}]                                        after [TOOL_CALLS]
    <tool_call>[{"name": ...}]</tool_call>                             between tags

Text around is content (vLLM drops a message whose bare list is followed by text back to
content whole; here the calls stand). A code block that does not hold just such a list is prose:
content, with no call looked for inside it. A marker not followed by a valid list stays content.
"""

from __future__ import annotations

from shared.processor.parsers.json_list import closer_after, list_calls
from shared.processor.parsers.scan import could_become, held_tail, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser

FENCE, TOOL_CALLS, TOOL_CALL, TOOL_CALL_END, THINK_END = "```", "[TOOL_CALLS]", "<tool_call>", "</tool_call>", "</think>"
MARKERS = (FENCE, TOOL_CALLS, TOOL_CALL, THINK_END)


class XLAMToolParser(ToolParser):
    name = "xlam"
    # Per-output state, set on the instance (class defaults, so the base constructor is kept as is).
    _bare = True  # a bare list may start here: the output's start, or just after </think>
    _fenced = False  # inside a code block that holds prose

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        pos = 0
        while True:
            if self._bare:
                step = self._read_bare(text, pos, final)
            else:
                markers = (FENCE,) if self._fenced else MARKERS
                found = [(at, m) for m in markers if (at := text.find(m, pos)) >= 0]
                if not found:
                    end = len(text) if final else len(text) - max(held_tail(text[pos:], m) for m in markers)
                    return [*segments, text[pos:end]], end
                start, marker = min(found)
                segments.append(text[pos:start])
                pos = start
                step = self._after_marker(text, start, marker, final)
            if step is None:
                return segments, pos
            segments.extend(step[0])
            pos = step[1]

    def _read_bare(self, text: str, pos: int, final: bool) -> tuple[list[Segment], int] | None:
        """A bare list of calls at pos (after whitespace); ([], pos) when there is none."""
        start = skip_space(text, pos)
        if could_become(text[start:], TOOL_CALLS) and not final:
            return None
        self._bare = False
        if text[start:start + 1] != "[" or text.startswith(TOOL_CALLS, start):
            return [], pos
        step = list_calls(text, start, final, self._brackets)
        if step is None:
            self._bare = True
            return None
        calls, end = step
        return calls or [text[pos:end]], end

    def _after_marker(self, text: str, start: int, marker: str, final: bool) -> tuple[list[Segment], int] | None:
        body = start + len(marker)
        if marker == THINK_END or self._fenced:
            self._bare, self._fenced = marker == THINK_END, False
            return [marker], body
        closer = {FENCE: FENCE, TOOL_CALL: TOOL_CALL_END}.get(marker, "")
        if marker == FENCE and text.startswith("json", body):
            body += len("json")
        elif marker == FENCE and could_become(text[body:], "json") and not final:
            return None
        pos = skip_space(text, body)
        if pos == len(text) and not final:
            return None
        step = list_calls(text, pos, final, self._brackets) if text[pos:pos + 1] == "[" else (None, pos)
        if step is None:
            return None
        calls, end = step
        close = closer_after(text, end, closer, final) if closer and calls else end
        if close is None:
            return None
        if calls is None or close < 0:
            self._fenced = marker == FENCE  # a code block of prose: its closing fence is content
            return [marker], start + len(marker)
        return calls, close
