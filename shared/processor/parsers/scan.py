"""Text scanning shared by the parsers: where a bracketed value ends, how much of a text's tail
could still become a marker, and a call object turned into a ToolCall."""

from __future__ import annotations

from typing import Any

from shared.processor.parsers.types import ToolCall, dumps, loads

_OPEN, _CLOSE = "[{(", "]})"


def held_tail(text: str, marker: str) -> int:
    """The length of the longest tail of text that is a proper prefix of marker: text a stream
    must hold back, since the next delta may complete the marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def could_become(text: str, marker: str) -> bool:
    """True when text is a proper prefix of marker (more text may complete it)."""
    return len(text) < len(marker) and marker.startswith(text)


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def bracket_end(text: str, start: int, quotes: str = '"') -> int | None:
    """The index just past the bracket that closes the one at text[start], skipping brackets
    inside quoted strings (backslash escapes honoured); None while it is not closed yet. Bracket
    kinds are not matched here: the caller's parser rejects a mismatched value."""
    depth, quote, i = 0, "", start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in quotes:
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def json_value(text: str) -> Any:
    """The JSON value text holds, or None when it is not strict JSON."""
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return None


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from ``{"name": ..., "arguments": {...}}`` (arguments under the first of
    args_keys present; absent means no arguments; an object encoded as a JSON string is accepted);
    None when obj is not such an object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in args_keys if k in obj), None)
    if set(obj) - {"name", *args_keys} or sum(k in obj for k in args_keys) > 1:
        return None
    args = {} if key is None else obj[key]
    if isinstance(args, str):
        args = json_value(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], dumps(args))
