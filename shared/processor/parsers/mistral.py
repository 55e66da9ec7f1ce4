"""mistral: Mistral tool calls, ``[TOOL_CALLS]`` followed by a JSON list of call objects (the
v3 tokenizers' format), or by ``name[ARGS]{...}`` for each call (the v11+ format):

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

Text outside is content. A marker not followed by valid calls stays content, with the text it
was followed by up to where that text's JSON value closes.
"""

from __future__ import annotations

import re

from shared.processor.parsers.scan import Brackets, call_from_object, json_value, skip_space
from shared.processor.parsers.tool_parser import MarkedToolParser, Segment
from shared.processor.parsers.types import ToolCall, dumps

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAMED = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")
_NAMED_PARTIAL = re.compile(r"[A-Za-z0-9_.\-]+(\[(A(R(G(S)?)?)?)?)?")


class MistralToolParser(MarkedToolParser):
    name = "mistral"
    marker = MARKER
    special_markers = (MARKER, ARGS)

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        step = _calls_after(text, start + len(MARKER), final, self._brackets)
        if step is None:
            return None
        calls, end = step
        return [*calls] or [text[start:end]], end


def _calls_after(text: str, pos: int, final: bool, brackets: Brackets) -> tuple[list[ToolCall], int] | None:
    """The calls after a marker and where they end; ([], end) for text that is not calls (content
    up to end); None when more text could decide."""
    named = _NAMED.match(text, pos)
    if named is None and _NAMED_PARTIAL.fullmatch(text, pos) and not final:
        return None
    value = skip_space(text, named.end() if named else pos)
    if value == len(text):
        return None if not final else ([], len(text))
    if text[value] not in "[{":
        return [], value
    end = brackets.end(text, value)
    if end is None:
        return None if not final else ([], len(text))
    parsed = json_value(text[value:end])
    if named:
        call = ToolCall(named.group(1), dumps(parsed)) if isinstance(parsed, dict) else None
        return ([call] if call else []), end
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [call_from_object(item) for item in items]
    return ([] if not items or None in calls else calls), end  # type: ignore[return-value]
