"""Values the parsers produce: a parsed tool call, one streamed delta, one whole parsed message."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The call as it appears in a chat message's ``tool_calls``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class DeltaMessage:
    """One streamed piece of an assistant message (one SSE chunk's ``delta``): text, reasoning
    text, or OpenAI-shaped tool call deltas (``{"index", "id", "type", "function": {"name",
    "arguments"}}`` for a call's first delta, ``{"index", "function": {"arguments"}}`` after)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        """The delta's fields that are set (``reasoning_content`` also as vLLM's newer ``reasoning``)."""
        out: dict[str, Any] = {}
        if self.content is not None:
            out["content"] = self.content
        if self.reasoning_content is not None:
            out["reasoning_content"] = out["reasoning"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass
class ParsedMessage:
    """A whole assistant output split into reasoning, content and tool calls (None when empty)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def from_deltas(cls, deltas: list[DeltaMessage]) -> ParsedMessage:
        """The message those deltas stream (a call's id, name and argument fragments joined)."""
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join(d.reasoning_content or "" for d in deltas)
        calls: dict[int, dict[str, str]] = {}
        for delta in deltas:
            for part in delta.tool_calls:
                call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] = part.get("id", call["id"])
                call["name"] += part["function"].get("name", "")
                call["arguments"] += part["function"].get("arguments", "")
        tool_calls = [ToolCall(c["name"], c["arguments"], c["id"]) for _, c in sorted(calls.items())]
        return cls(content or None, reasoning or None, tool_calls)


def dumps(value: Any) -> str:
    """Arguments as JSON text, the same in every parser (non-ASCII kept as is)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: Python reads infinity, which dumps cannot write back
        raise ValueError(f"{text} is out of a float's range")
    return value


def loads(text: str) -> Any:
    """JSON without NaN and Infinity (which Python's json accepts, also for a number as large as
    1e999), with raw control characters allowed inside strings (models write raw newlines in
    code arguments, and xgrammar's JSON grammar lets them through); dumps escapes them again."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, strict=False)
