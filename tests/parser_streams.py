"""What the tool-parser tests share: a text fed to a new parser in pieces, and the shape OpenAI
gives streamed tool-call deltas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def stream(make_parser: Callable[[], Any], text: str, cuts: list[int]) -> list:
    """The deltas of ``text`` fed to ``make_parser()`` split at ``cuts``, then finished."""
    parser, deltas, last = make_parser(), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += parser.feed(text[last:cut])
        last = cut
    return deltas + parser.finish()


def check_call_deltas(deltas: list, id_prefix: str = "") -> None:
    """No empty delta; a call's first delta has its index (in order), an id starting with
    ``id_prefix``, type, name and no arguments yet; its later deltas only arguments."""
    seen: set[int] = set()
    for delta in deltas:
        assert delta.content or delta.tool_calls or delta.reasoning_content, "empty delta"
        for part in delta.tool_calls:
            if part["index"] not in seen:
                assert part["index"] == len(seen) and part["id"] and part["id"].startswith(id_prefix)
                assert part["type"] == "function" and part["function"]["name"]
                assert part["function"]["arguments"] == ""
                seen.add(part["index"])
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
