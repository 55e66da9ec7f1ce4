"""glm45: GLM-4.5 and GLM-4.6 tool calls, the function's name after the opening tag and each
argument as a key and a raw-text value between tags:

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

The name ends at the first newline or ``<arg_key>`` (spaces around it are dropped; a call may have
no arguments); keys and values are stripped of surrounding whitespace. As vLLM types them, a
value whose property in the request's tool schema has type "string" keeps its text; any other
value (another type, a key the schema does not name, no schema, or a function not among the
tools, which vLLM still returns as a call) is read as JSON, else as a Python literal, else kept
as text. Text outside the tags is content; a block holding anything but such a name and pairs,
or one the output leaves unclosed, stays content, tags and all.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from shared.processor.parsers.qwen3_coder import read_value, schema_properties
from shared.processor.parsers.scan import skip_space
from shared.processor.parsers.tool_parser import TaggedToolParser
from shared.processor.parsers.types import ToolCall, dumps, loads

START, END = "<tool_call>", "</tool_call>"
KEY, KEY_END = "<arg_key>", "</arg_key>"
VALUE, VALUE_END = "<arg_value>", "</arg_value>"
NAME = re.compile(r"[^\s<>]+")


class Glm45ToolParser(TaggedToolParser):
    name = "glm45"
    marker, end = START, END

    def _call_of(self, body: str) -> ToolCall | None:
        """The call a block's name and key/value pairs make; None when malformed."""
        cut = min(i for i in (body.find("\n"), body.find(KEY), len(body)) if i >= 0)
        name = body[:cut].strip()
        if not NAME.fullmatch(name):
            return None
        properties = schema_properties(self.tools, name)
        args: dict[str, Any] = {}
        pos = skip_space(body, cut)
        while pos < len(body):
            pair = _pair(body, pos)
            if pair is None:
                return None
            key, value, pos = pair
            string = isinstance(properties.get(key), dict) and properties[key].get("type") == "string"
            args[key] = value if string else read_value(value, (loads, ast.literal_eval))
        return ToolCall(name, dumps(args))


def _pair(body: str, pos: int) -> tuple[str, str, int] | None:
    """The key and value of the ``<arg_key>`` at pos, and where the next one may start."""
    if not body.startswith(KEY, pos):
        return None
    key_end = body.find(KEY_END, pos)
    if key_end < 0:
        return None
    value = skip_space(body, key_end + len(KEY_END))
    value_end = body.find(VALUE_END, value)
    if not body.startswith(VALUE, value) or value_end < 0:
        return None
    key = body[pos + len(KEY):key_end].strip()
    return key, body[value + len(VALUE):value_end].strip(), skip_space(body, value_end + len(VALUE_END))
