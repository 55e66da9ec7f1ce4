"""Scanning shared by the formats whose calls are a JSON list of call objects (granite, jamba,
phi4_mini_json, xlam) or a call object closed by a marker (internlm)."""

from __future__ import annotations

from shared.processor.parsers.scan import Brackets, call_from_object, could_become, json_value, skip_space
from shared.processor.parsers.types import ToolCall


def list_calls(text: str, pos: int, final: bool, brackets: Brackets,
               args_keys: tuple[str, ...] = ("arguments",)) -> tuple[list[ToolCall] | None, int] | None:
    """The JSON list of call objects whose ``[`` is at text[pos], and the index past its closing
    bracket; calls None when the value is not a non-empty list of valid calls (and, final, the
    text's end when the list never closes); None while more text could decide."""
    end = brackets.end(text, pos)
    if end is None:
        return (None, len(text)) if final else None
    items = json_value(text[pos:end])
    if not isinstance(items, list) or not items:
        return None, end
    calls = [call_from_object(item, args_keys) for item in items]
    return (None if None in calls else calls), end  # type: ignore[return-value]


def closer_after(text: str, pos: int, closer: str, final: bool) -> int | None:
    """The index past closer when it follows pos (whitespace between allowed); -1 when other
    text follows; None while more text could decide."""
    pos = skip_space(text, pos)
    if text.startswith(closer, pos):
        return pos + len(closer)
    if could_become(text[pos:], closer) and not final:
        return None
    return -1
