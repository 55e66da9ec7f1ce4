"""Checks on the tool parts of a chat request, with OpenAI's 400 semantics: each failure raises
InvalidRequest (a ValueError) whose message and ``param`` name the field, e.g.
``tools[1].function.parameters``. The checks return the tools and tool_choice normalized."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.processor.errors import InvalidRequest

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    """A validated function tool (parameters None: it takes no arguments)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def to_openai(self) -> dict[str, Any]:
        """The tool as chat templates and clients see it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def _fail(param: str, rule: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {rule}", param)


def check_tools(tools: Any) -> list[Tool]:
    """The request's ``tools`` (None: no tools) as Tools: a list of at most MAX_TOOLS function
    tools with distinct valid names and JSON-schema parameters of type object."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _fail("tools", "must be a list of tools.")
    if len(tools) > MAX_TOOLS:
        raise _fail("tools", f"must hold at most {MAX_TOOLS} tools, got {len(tools)}.")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _fail(f"{param}.type", "only tools of type 'function' are supported.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _fail(f"{param}.function", "must be an object with a name.")
        out.append(_check_function(function, f"{param}.function"))
        if out[-1].name in [t.name for t in out[:-1]]:
            raise _fail(f"{param}.function.name", f"the function name {out[-1].name!r} is given twice.")
    return out


def _check_function(function: dict[str, Any], param: str) -> Tool:
    name, description = function.get("name"), function.get("description")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _fail(f"{param}.name", "must be 1 to 64 letters, digits, underscores or dashes, "
                    f"got {name!r}.")
    if description is not None and not isinstance(description, str):
        raise _fail(f"{param}.description", "must be a string.")
    parameters = function.get("parameters")
    if parameters is not None:
        _check_schema(parameters, f"{param}.parameters")
    return Tool(name, description, parameters)


def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise _fail(param, "must be a JSON schema (an object).")
    if schema.get("type", "object") != "object":
        raise _fail(param, f"must be a JSON schema of type 'object', got type {schema['type']!r}.")
    try:
        from jsonschema import SchemaError, validators
    except ImportError:  # the structural checks above are all that can be done
        return
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise _fail(param, f"is not a valid JSON schema: {exc.message}" + (f" (at {where})" if where else "")) \
            from None
    except RecursionError:
        raise _fail(param, "is nested too deeply.") from None


def check_tool_choice(tool_choice: Any, tools: list[Tool], parallel_tool_calls: Any = None) -> str | dict[str, Any]:
    """The request's tool_choice, normalized ("none", "auto", "required" or
    ``{"type": "function", "function": {"name": ...}}``); unset, "auto" with tools and "none"
    without. tool_choice needs tools, and a named function must be one of them."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _fail("parallel_tool_calls", "must be a boolean.")
    if tool_choice is None:
        return "auto" if tools else "none"
    if not tools:
        raise _fail("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
    if isinstance(tool_choice, str):
        if tool_choice not in _CHOICES:
            raise _fail("tool_choice", f"must be one of {', '.join(_CHOICES)} or a named function, "
                        f"got {tool_choice!r}.")
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(function, dict):
        raise _fail("tool_choice", "must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}.")
    name = function.get("name")
    if name not in [t.name for t in tools]:
        raise _fail("tool_choice.function.name", f"no function named {name!r} is in 'tools'.")
    return {"type": "function", "function": {"name": name}}


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Assistant tool_calls are well formed with distinct ids, and every tool message answers
    (tool_call_id) a call an earlier assistant message made."""
    ids: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise _fail(f"messages[{i}].tool_calls", "must be a list of tool calls.")
            for j, call in enumerate(calls):
                ids.add(_check_call(call, f"messages[{i}].tool_calls[{j}]", ids))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _fail(f"messages[{i}].tool_call_id", "a tool message must have a tool_call_id.")
            if call_id not in ids:
                raise _fail(f"messages[{i}].tool_call_id", f"{call_id!r} answers no tool call of an earlier "
                            "assistant message.")


def _check_call(call: Any, param: str, ids: set[str]) -> str:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise _fail(param, "must be a tool call of type 'function'.")
    call_id, function = call.get("id"), call.get("function")
    if not isinstance(call_id, str) or not call_id or call_id in ids:
        raise _fail(f"{param}.id", "must be a non-empty string, distinct from the other calls' ids.")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not isinstance(function.get("arguments"), str):
        raise _fail(f"{param}.function", "must have a name and arguments (a JSON string).")
    return call_id
