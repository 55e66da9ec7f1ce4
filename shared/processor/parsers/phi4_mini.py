"""phi4_mini_json: Phi-4-mini tool calls, the plain word ``functools`` followed at once by a JSON
list of call objects (``arguments``, or ``parameters`` as vLLM also accepts):

    functools[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

Text around the list is content (vLLM drops it when there are calls; here it stays), and so is
``functools`` when no such list follows (prose about Python's functools module).
"""

from __future__ import annotations

from shared.processor.parsers.json_list import list_calls
from shared.processor.parsers.tool_parser import MarkedToolParser, Segment

MARKER = "functools"


class Phi4MiniJsonToolParser(MarkedToolParser):
    name = "phi4_mini_json"
    marker = MARKER

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        pos = start + len(MARKER)
        if pos == len(text) and not final:
            return None
        if text[pos:pos + 1] != "[":
            return [MARKER], pos
        step = list_calls(text, pos, final, self._brackets, ("arguments", "parameters"))
        if step is None:
            return None
        calls, end = step
        return calls or [text[start:end]], end
