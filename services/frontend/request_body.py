"""The base of every request body: strict pydantic, plus one check over the whole parsed JSON
for values that no wire can carry. Each would otherwise fail later, far from the client: an
integer beyond 64 bits in msgspec's encoder, a lone surrogate in the tokenizer or in UTF-8
output, NaN in a schema. They get a 400 naming the field instead."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(strict=True, extra="ignore")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
WIRE_ERROR = "wire_value"  # the pydantic error type of a value that no wire format can carry
NESTED_ERROR = "nested_value"  # a check that names a place below its field (ctx 'below': "[0].type")


def _safe(text: str) -> str:
    """``text`` printable in an error message (lone surrogates escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _problem(value: Any) -> str | None:
    """Why one JSON scalar cannot cross the wire (msgpack, UTF-8, the tokenizer), or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"the string contains a lone surrogate ({_safe(exc.object[exc.start])}), which is not valid Unicode"
        return None
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return "the integer does not fit in a signed 64-bit integer"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return None


def find_unwireable(document: Any) -> tuple[str | None, str, str] | None:
    """(top-level field, path, problem) of a value in a parsed JSON body that cannot cross the
    wire: an integer beyond signed 64 bits, NaN or infinity, a string (value or key) with a lone
    surrogate. One check for every field, nested ones included; None when all is well."""
    stack: list[tuple[str | None, str, Any]] = [(None, "", document)]
    while stack:
        top, path, value = stack.pop()
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                name = _safe(str(key))
                items.append((top or name, f"{path}.{name}" if path else name, key, item))
        elif isinstance(value, list):
            if all(type(x) is int for x in value) and INT64_MIN <= min(value, default=0) <= max(value, default=0) <= INT64_MAX:
                continue  # token ids: the common big list, checked at C speed
            items = [(top, f"{path}[{i}]", None, item) for i, item in enumerate(value)
                     if isinstance(item, (dict, list)) or _problem(item) is not None]  # scalars: one pass
        else:
            problem = _problem(value)
            if problem is not None:
                return top, path, problem
            continue
        for sub_top, sub_path, key, item in items:
            if key is not None and (problem := _problem(key)) is not None:
                return sub_top, sub_path, problem.replace("the string", "the key", 1)
        stack.extend((sub_top, sub_path, item) for sub_top, sub_path, _, item in reversed(items))
    return None


class RequestBody(BaseModel):
    """A request body: strict, and checked as a whole for values no wire can carry (so they get
    a 400 naming the field rather than failing later in msgspec or the tokenizer)."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _check_wire(cls, data: Any) -> Any:
        found = find_unwireable(data)
        if found is not None:
            top, path, problem = found
            where = f" for '{path}'" if path else ""
            raise PydanticCustomError(WIRE_ERROR, "Invalid value{where}: {problem}.",
                                      {"param": top, "where": where, "problem": problem})
        return data
