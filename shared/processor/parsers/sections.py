"""Formats whose calls sit in a section, each call between its own markers (DeepSeek V3 and
V3.1, Kimi K2):

    SECTION_BEGIN CALL_BEGIN body CALL_END CALL_BEGIN body CALL_END SECTION_END

A section's calls are read in order, each streamed once its end marker has come and its body is
a valid call (space between calls is markup). From the first piece that is not such a call (a
call malformed or cut short, or other text), the rest is content, markers and all: the section's
begin marker too when no call came before it. Text outside sections is content. An output that
ends after a call without the section's end marker keeps its calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from shared.processor.parsers.scan import could_become, held_tail, json_value, skip_space
from shared.processor.parsers.tool_parser import Segment, ToolParser
from shared.processor.parsers.types import ToolCall, dumps
from shared.processor.parsers.validation import Tool


class SectionToolParser(ToolParser):
    """A format of calls in sections; a subclass names its markers and reads one call's body."""

    section: ClassVar[tuple[str, str]]  # the section's begin and end markers
    call: ClassVar[tuple[str, str]]  # one call's begin and end markers

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        super().__init__(tools)
        self._inside = False  # in a section, after a call

    def _parse(self, body: str) -> ToolCall | None:
        """The call that the text between a call's markers holds; None when it is not one."""
        raise NotImplementedError

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        pos = 0
        while True:
            if self._inside:
                start, step = pos, self._next(text, pos, pos, final)
            else:
                start = text.find(self.section[0], pos)
                if start < 0:
                    end = len(text) if final else len(text) - held_tail(text[pos:], self.section[0])
                    segments.append(text[pos:end])
                    return segments, end
                segments.append(text[pos:start])
                step = self._next(text, start, start + len(self.section[0]), final)
            if step is None:
                return segments, start
            segments.extend(step[0])
            pos = step[1]

    def _next(self, text: str, start: int, pos: int, final: bool) -> tuple[list[Segment], int] | None:
        """What the section holds at pos (after space): a call, or its end marker; otherwise the
        content from start (a section's begin marker, or the space after a call) and where it
        ends; None when more text could decide."""
        pos = skip_space(text, pos)
        begin, end = self.call
        if text.startswith(begin, pos):
            stop = text.find(end, pos + len(begin))
            if stop < 0:
                return None if not final else self._as_content(text, start, len(text))
            call = self._parse(text[pos + len(begin):stop])
            if call is None:
                return self._as_content(text, start, stop + len(end))
            self._inside = True
            return [call], stop + len(end)
        if self._inside and text.startswith(self.section[1], pos):
            self._inside = False
            return [], pos + len(self.section[1])
        rest = text[pos:]
        if not final and (could_become(rest, begin) or self._inside and could_become(rest, self.section[1])):
            return None
        return self._as_content(text, start, pos)  # other text, or the end of the output

    def _as_content(self, text: str, start: int, end: int) -> tuple[list[Segment], int]:
        self._inside = False
        return [text[start:end]], end


def arguments(text: str) -> str | None:
    """A call's arguments as JSON object text (none written means no arguments); None when text
    is not a JSON object."""
    value = json_value(text) if text.strip() else {}
    return dumps(value) if isinstance(value, dict) else None
