"""tool_choice "required" or named: the output is constrained (structured outputs, a JSON schema
xgrammar compiles) to a JSON array of calls, each ``{"name": ..., "parameters": {...}}`` with its
tool's parameter schema, so even a random model returns valid calls:

    [{"name": "get_weather", "parameters": {"city": "Paris"}}]

``forced_calls_schema`` builds the schema; ForcedCallsParser reads such output back as calls,
whole or streamed (an output cut short, by max_tokens, keeps its complete calls; the rest is
content).
"""

from __future__ import annotations

import copy
from typing import Any

from shared.processor.parsers.scan import call_from_object, json_value, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser
from shared.processor.parsers.validation import Tool

_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def forced_calls_schema(tools: list[Tool], tool_choice: str | dict[str, Any], parallel_tool_calls: bool = True
                        ) -> dict[str, Any]:
    """The JSON schema of a call list for validated tools and a validated "required" or named
    tool_choice: any of the tools (required) or only the named one; exactly one call when
    parallel_tool_calls is false, at least one otherwise. Each tool's schema sits under
    ``$defs`` with its local ``$ref``s rewritten to point there."""
    if isinstance(tool_choice, dict):
        chosen = [t for t in tools if t.name == tool_choice["function"]["name"]]
    else:
        chosen = list(tools)
    defs = {f"tool_{i}": _rebase({"type": "object", **t.parameters} if t.parameters else _NO_PARAMETERS,
                                 f"#/$defs/tool_{i}") for i, t in enumerate(chosen)}
    items = [{"type": "object",
              "properties": {"name": {"const": t.name}, "parameters": {"$ref": f"#/$defs/tool_{i}"}},
              "required": ["name", "parameters"], "additionalProperties": False}
             for i, t in enumerate(chosen)]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                              "minItems": 1, "$defs": defs}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def _rebase(schema: Any, root: str) -> Any:
    """A copy of schema whose local references (``#...``) point into it at root."""
    if isinstance(schema, dict):
        out = {k: _rebase(v, root) for k, v in schema.items() if k != "$ref"}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = root + ref[1:]
        elif "$ref" in schema:
            out["$ref"] = copy.deepcopy(ref)
        return out
    if isinstance(schema, list):
        return [_rebase(v, root) for v in schema]
    return schema


class ForcedCallsParser(ToolParser):
    """Reads a ``[{"name": ..., "parameters": ...}, ...]`` output back as tool calls."""

    name = "forced"

    def __init__(self) -> None:
        super().__init__()
        self._rest = False  # past the array (or past finding the text is not one): content
        self._opened = False

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        used = 0
        while not self._rest:
            pos = skip_space(text, used)
            if pos == len(text) and not final:
                return segments, used
            if pos == len(text) or text[pos] not in (",]" if self._opened else "["):
                break
            if text[pos] == "]":
                used = pos + 1
                break
            item = skip_space(text, pos + 1)  # an item and the "[" or "," before it go together
            end = self._brackets.end(text, item) if text[item:item + 1] == "{" else -1
            if (end is None or item == len(text)) and not final:
                return segments, used
            call = call_from_object(json_value(text[item:end]), ("parameters",)) if end and end > 0 else None
            if call is None:
                break
            segments.append(call)
            self._opened, used = True, end
        self._rest = True
        segments.append(text[used:])
        return segments, len(text)
