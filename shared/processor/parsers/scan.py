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


class Brackets:
    """Finds where a bracketed value ends, skipping brackets inside quoted strings (backslash
    escapes honoured). A stream asks again about the same value as its text grows, so the scan
    resumes where the last one stopped: linear in the value's length, not quadratic. Bracket
    kinds are not matched here: the caller's parser rejects a mismatched value."""

    def __init__(self, quotes: str = '"') -> None:
        self.quotes = quotes
        self.reset()

    def reset(self) -> None:
        """Forget the value being scanned (call when the text it indexes was trimmed)."""
        self._start, self._pos, self._depth, self._quote = -1, 0, 0, ""

    def end(self, text: str, start: int) -> int | None:
        """The index just past the bracket that closes the one at text[start]; None while it is
        not closed yet."""
        if start != self._start or self._pos > len(text):
            self._start, self._pos, self._depth, self._quote = start, start, 0, ""
        depth, quote, i = self._depth, self._quote, self._pos
        while i < len(text):
            char = text[i]
            if quote:
                if char == "\\":
                    if i + 1 == len(text):
                        break  # resume at the backslash once the escaped character arrives
                    i += 1
                elif char == quote:
                    quote = ""
            elif char in self.quotes:
                quote = char
            elif char in _OPEN:
                depth += 1
            elif char in _CLOSE:
                depth -= 1
                if depth == 0:
                    self.reset()
                    return i + 1
            i += 1
        self._pos, self._depth, self._quote = i, depth, quote
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
