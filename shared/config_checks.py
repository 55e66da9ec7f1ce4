"""Checks every config dataclass shares (shared/config.py). A bool field takes True or False
only: a truthy "yes" or 2**64 passed as LLM(async_scheduling=...) is a mistake to report, not a
switch to turn on."""

from __future__ import annotations

import dataclasses
from typing import Any


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    """ValueError unless ``value`` is True or False (or None, when ``optional``)."""
    if isinstance(value, bool) or (optional and value is None):
        return
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_bool_fields(config: Any) -> None:
    """check_bool on each field a dataclass annotates as bool (or bool | None)."""
    for f in dataclasses.fields(config):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind in ("bool", "bool | None", "Optional[bool]"):
            check_bool(f.name, getattr(config, f.name), optional=kind != "bool")
