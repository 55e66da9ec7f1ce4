"""The interface every tool-call parser shares, and the streaming that is the same for all.

A parser is made per output (one per choice) and fed the output's text deltas in order. Its
format's scanner (``_scan``) resolves the buffered text into content and calls only as far as no
later text can change the result, and says how much it consumed; the rest stays buffered. So the
streamed deltas are the same whatever the split, and ``extract`` is a single feed of the whole
text: one code path for both. A call is streamed once it is complete and valid (a first delta
with index, id, type and name, then its arguments): a call cut short or malformed stays content,
so nothing streamed as a call ever has to be taken back.

Whitespace-only content next to a call (before the first, between two, after the last) is
dropped, so a message of calls alone has content None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from shared.processor.parsers.scan import Brackets, held_tail
from shared.processor.parsers.types import DeltaMessage, ParsedMessage, ToolCall
from shared.processor.parsers.validation import Tool

Segment = str | ToolCall  # resolved content text, or a call


class ToolParser:
    """Parses one model output into content and tool calls, whole or streamed."""

    name: ClassVar[str]
    # Markers that are special tokens in the model family's tokenizer: the detokenizer must keep
    # them (skip_special_tokens=False) for the parser to see them.
    special_markers: ClassVar[tuple[str, ...]] = ()
    quotes: ClassVar[str] = '"'  # string quotes of the format's values

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        self.tools = tuple(tools)  # the request's tools: formats whose values are typed by schema read them
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._space = ""  # whitespace-only content since the start or the last call, held
        self._spoken = False  # the content since the start or the last call has non-space text
        self._brackets = Brackets(self.quotes)

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        """Resolve the buffered text: the segments no later text can change, and how many
        characters they consumed. With final, everything is consumed."""
        raise NotImplementedError

    def feed(self, delta: str) -> list[DeltaMessage]:
        """The deltas that the next piece of the output's text resolves."""
        self._buffer += delta
        return self._resolve(final=False)

    def finish(self) -> list[DeltaMessage]:
        """The deltas left at the end of the output (held text resolved as content or calls)."""
        out = self._resolve(final=True)
        if self._space and not self.calls:
            out.append(DeltaMessage(content=self._space))
        self._space = ""
        return out

    @classmethod
    def extract(cls, text: str) -> ParsedMessage:
        """A whole output's content (None when empty) and calls."""
        parser = cls()
        return ParsedMessage.from_deltas(parser.feed(text) + parser.finish())

    def _resolve(self, final: bool) -> list[DeltaMessage]:
        segments, used = self._scan(self._buffer, final)
        if used:
            self._buffer = self._buffer[used:]
            self._brackets.reset()  # its positions indexed the untrimmed buffer
        out: list[DeltaMessage] = []
        for segment in segments:
            if isinstance(segment, ToolCall):
                out.extend(self._call(segment))
            elif segment:
                out.extend(self._content(segment))
        return out

    def _content(self, text: str) -> list[DeltaMessage]:
        if not self._spoken and not text.strip():
            self._space += text
            return []
        text, self._space, self._spoken = self._space + text, "", True
        return [DeltaMessage(content=text)]

    def _call(self, call: ToolCall) -> list[DeltaMessage]:
        index = len(self.calls)
        self.calls.append(call)
        self._space, self._spoken = "", False
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return [DeltaMessage(tool_calls=[head]),
                DeltaMessage(tool_calls=[{"index": index, "function": {"arguments": call.arguments}}])]


class MarkedToolParser(ToolParser):
    """A format whose calls each start at a marker, with prose anywhere around them."""

    marker: ClassVar[str]

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        """What the marker at start begins (a call, or the content it stays) and where it ends;
        None when more text could decide."""
        raise NotImplementedError

    def _scan(self, text: str, final: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        pos = 0
        while True:
            start = text.find(self.marker, pos)
            if start < 0:
                end = len(text) if final else len(text) - held_tail(text[pos:], self.marker)
                segments.append(text[pos:end])
                return segments, end
            segments.append(text[pos:start])
            step = self._read(text, start, final)
            if step is None:
                return segments, start
            segments.extend(step[0])
            pos = step[1]


class TaggedToolParser(MarkedToolParser):
    """A format whose every call is one block between a start tag (the marker) and an end tag:
    a block whose body makes no call, or one the output leaves unclosed, stays content, tags and all."""

    end: ClassVar[str]

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        super().__init__(tools)
        # how much of the open block (from its start) was searched for its end tag already: a long
        # block streamed in small deltas is searched once through, not again at every delta
        self._searched = 0

    def _call_of(self, body: str) -> ToolCall | None:
        """The call a block's body makes; None when it is malformed."""
        raise NotImplementedError

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        body = start + len(self.marker)
        stop = text.find(self.end, max(body, start + self._searched - len(self.end) + 1))
        self._searched = 0 if stop >= 0 or final else len(text) - start
        if stop < 0:
            return None if not final else ([text[start:]], len(text))
        end = stop + len(self.end)
        return [self._call_of(text[body:stop]) or text[start:end]], end
