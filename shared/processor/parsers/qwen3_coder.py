"""qwen3_coder: Qwen3-Coder and Qwen3-Next tool calls, XML-style, one function per tagged block,
each argument's value raw text on lines of its own:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value is the text between its tags less one leading and one trailing newline, typed as vLLM
types it by the property's ``type`` in the request's tool schema: "null" (any case) is null for
every type; a string type keeps the text, and so does a property with no type, a key the schema
does not name, a tool without parameters, and a function not among the tools (which vLLM still
returns as a call); an integer type takes ``int(text)``; a number type ``float(text)``, written
as an integer when whole; a boolean type is true for "true" (any case), false for anything else;
an object or array type is read as JSON, else as a Python literal; any other type as a Python
literal. A value that does not convert, or converts to no JSON value (infinity, a set), keeps its
text. Text outside the tags is content; a block that is not exactly one function of such
parameters, or one the output leaves unclosed, stays content, tags and all.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from typing import Any

from shared.processor.parsers.scan import skip_space
from shared.processor.parsers.tool_parser import TaggedToolParser
from shared.processor.parsers.types import ToolCall, dumps, loads
from shared.processor.parsers.validation import Tool

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
LABEL = re.compile(r"[^<>\n]+")  # a function name or a parameter key: one line, no tags

_STRING = ("string", "str", "text", "varchar", "char", "enum")
_INTEGER = ("int", "uint", "long", "short", "unsigned")
_NUMBER = ("num", "float")
_BOOLEAN = ("boolean", "bool", "binary")
_STRUCTURED = ("object", "array", "arr")


def schema_properties(tools: Sequence[Tool], name: str) -> dict[str, Any]:
    """The named tool's parameter properties; empty when it has none or is not among tools."""
    tool = next((t for t in tools if t.name == name), None)
    properties = (tool.parameters or {}).get("properties") if tool else None
    return properties if isinstance(properties, dict) else {}


def jsonable(value: Any) -> bool:
    """True when value can be written as JSON (not infinity, a set, bytes, ...)."""
    try:
        dumps(value)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def read_value(text: str, readers: Sequence[Callable[[str], Any]]) -> Any:
    """The JSON value the first of readers that can read text gives, else text itself."""
    for read in readers:
        try:
            value = read(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if jsonable(value):
            return value
    return text


def typed_value(text: str, schema: Any) -> Any:
    """A parameter's raw text as the value its schema's type says (see the module docstring)."""
    if text.lower() == "null":
        return None
    kind = schema.get("type", "string") if isinstance(schema, dict) else "string"
    kind = kind.strip().lower() if isinstance(kind, str) else ""
    if kind in _STRING:
        return text
    if kind in _BOOLEAN:
        return text.lower() == "true"
    if kind in _STRUCTURED or kind.startswith(("dict", "list")):
        return read_value(text, (loads, ast.literal_eval))
    if not kind.startswith(_INTEGER + _NUMBER):
        return read_value(text, (ast.literal_eval,))
    try:
        value = int(text) if kind.startswith(_INTEGER) else float(text)
    except ValueError:
        return text
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if jsonable(value) else text


class Qwen3CoderToolParser(TaggedToolParser):
    name = "qwen3_coder"
    marker, end = START, END

    def _call_of(self, body: str) -> ToolCall | None:
        """The call a block's ``<function=NAME>...</function>`` makes; None when malformed."""
        body = body.strip()
        head = body.find(">")
        if not body.startswith(FUNCTION) or head < 0 or not LABEL.fullmatch(body[len(FUNCTION):head]):
            return None
        name = body[len(FUNCTION):head]
        properties = schema_properties(self.tools, name)
        args: dict[str, Any] = {}
        pos = skip_space(body, head + 1)
        while body.startswith(PARAMETER, pos):
            key_end = body.find(">", pos)
            value_end = body.find(PARAMETER_END, key_end)
            key = body[pos + len(PARAMETER):key_end]
            if key_end < 0 or value_end < 0 or not LABEL.fullmatch(key):
                return None
            value = body[key_end + 1:value_end]
            value = value.removeprefix("\n").removesuffix("\n")
            args[key] = typed_value(value, properties.get(key))
            pos = skip_space(body, value_end + len(PARAMETER_END))
        if body[pos:] != FUNCTION_END:
            return None
        return ToolCall(name, dumps(args))
