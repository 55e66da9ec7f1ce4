"""pythonic: Llama 3.2 and Llama 4 tool calls, a Python list of calls with keyword arguments,
optionally between ``<|python_start|>`` and ``<|python_end|>`` (Llama 4):

    [get_weather(city="Paris"), get_time(zone='CET', utc=True)]

The list is parsed with Python's ast and each argument read with ast.literal_eval: nothing runs.
An output that does not start with such a list is content; so is the text after it.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from shared.processor.parsers.scan import could_become, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser
from shared.processor.parsers.types import ToolCall, dumps
from shared.processor.parsers.validation import Tool

START, END = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(ToolParser):
    name = "pythonic"
    special_markers = (START, END)
    quotes = "\"'"

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        super().__init__(tools)
        self._done = False  # past the list (or past finding there is none): content from here on

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        if self._done:
            return [text], len(text)
        pos = skip_space(text, 0)
        if text.startswith(START, pos):
            pos = skip_space(text, pos + len(START))
        elif could_become(text[pos:], START) and not final:
            return [], 0
        end = self._brackets.end(text, pos) if text[pos:pos + 1] == "[" else -1
        if pos == len(text) or end is None:
            if not final:
                return [], 0
            end = -1
        calls = _calls(text[pos:end]) if end > 0 else None
        self._done = True
        if not calls:
            return [text], len(text)
        tail = skip_space(text, end)
        if text.startswith(END, tail):
            end = tail + len(END)
        elif could_become(text[tail:], END) and not final:
            self._done = False
            return [], 0
        return [*calls, text[end:]], len(text)


def _calls(source: str) -> list[ToolCall] | None:
    """The calls a Python list of calls holds, or None when source is not one."""
    try:
        tree = ast.parse(source, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        return [_call(node) for node in tree.elts]
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError("not a call with keyword arguments")
    args = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            raise ValueError("not a keyword argument")
        args[keyword.arg] = _json_safe(ast.literal_eval(keyword.value))
    return ToolCall(node.func.id, dumps(args))


def _json_safe(value):
    """Python literals as JSON values: tuples become lists; dict keys must be strings."""
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("dict keys must be strings")
        return {k: _json_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{type(value).__name__} is not a JSON value")
