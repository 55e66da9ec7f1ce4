"""Reasoning parsers: ``<think>reasoning</think>content`` outputs split into reasoning_content and
content, whole or streamed, and the count of reasoning tokens for usage.

Where reasoning starts differs by family: DeepSeek-R1's templates end the prompt with ``<think>``,
so its outputs start inside the reasoning (an opening tag the model writes anyway is dropped);
Qwen3 writes ``<think>`` itself, except when the template opened it in the prompt (the 2507
Thinking models), and writes none at all with enable_thinking false (its template then closes an
empty block in the prompt). So a parser is made per output with the prompt's text, when known:
a prompt that ends in an open ``<think>`` starts the output inside the reasoning. Streaming holds
back only a tail that may be the start of a tag, so deltas are the same whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from shared.processor.parsers.scan import could_become, held_tail
from shared.processor.parsers.types import DeltaMessage, ParsedMessage

START, END = "<think>", "</think>"


class ReasoningParser:
    """Splits one output into reasoning and content (``<think>`` tags)."""

    name: ClassVar[str]
    always_reasoning: ClassVar[bool]  # outputs start inside the reasoning whatever the prompt

    def __init__(self, prompt: str | None = None) -> None:
        self.prompt = prompt
        opened = self.always_reasoning or (prompt is not None and prompt.rstrip().endswith(START))
        self._phase = "strip" if opened else "detect"  # strip: drop a leading <think>; detect: look for one
        self._buffer = ""
        self.reasoned = False  # the output had a reasoning part
        self.start_chars = 0  # length of the <think> the output itself opened with
        self.closed = False  # the reasoning part ended with </think>

    def feed(self, delta: str) -> list[DeltaMessage]:
        """The reasoning and content deltas the next piece of text resolves."""
        self._buffer += delta
        return self._resolve(final=False)

    def finish(self) -> list[DeltaMessage]:
        """The deltas left at the end of the output."""
        return self._resolve(final=True)

    def extract(self, text: str) -> ParsedMessage:
        """A whole output's reasoning_content and content (each None when empty)."""
        parser = type(self)(self.prompt)
        return ParsedMessage.from_deltas(parser.feed(text) + parser.finish())

    def _resolve(self, final: bool) -> list[DeltaMessage]:
        text, out = self._buffer, []
        if self._phase in ("strip", "detect"):
            if could_become(text, START) and not final:
                return []
            if text.startswith(START):
                text, self.start_chars = text[len(START):], len(START)
            self.reasoned = self._phase == "strip" or self.start_chars > 0
            self._phase = "reasoning" if self.reasoned else "content"
        if self._phase == "reasoning":
            stop = text.find(END)
            if stop < 0:
                keep = 0 if final else held_tail(text, END)
                self._buffer = text[len(text) - keep:]
                return [DeltaMessage(reasoning_content=text[:len(text) - keep])] if len(text) > keep else []
            out = [DeltaMessage(reasoning_content=text[:stop])] if stop else []
            text, self._phase, self.closed = text[stop + len(END):], "content", True
        self._buffer = ""
        return out + ([DeltaMessage(content=text)] if text else [])

    def count_reasoning_tokens(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int:
        """The output tokens spent reasoning, for usage's completion_tokens_details: those after an
        opening ``<think>`` and before the token that completes ``</think>`` (all to the end when
        it never does). decode turns token ids into text (the detokenizer's way); it is called
        O(log n) times, on prefixes of token_ids."""
        whole = type(self)(self.prompt)
        whole.feed(decode(token_ids))
        whole.finish()
        if not whole.reasoned:
            return 0
        opened = self._first(token_ids, decode, lambda p: p.start_chars > 0) if whole.start_chars else 0
        if not whole.closed:
            return len(token_ids) - opened
        return max(0, self._first(token_ids, decode, lambda p: p.closed) - 1 - opened)

    def _state_after(self, text: str) -> ReasoningParser:
        parser = type(self)(self.prompt)
        parser.feed(text)
        return parser

    def _first(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str],
               reached: Callable[[ReasoningParser], bool]) -> int:
        """The fewest leading tokens whose text reaches a state (the states only ever get reached
        as text grows, so a binary search finds it)."""
        lo, hi = 1, len(token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(self._state_after(decode(token_ids[:mid]))):
                hi = mid
            else:
                lo = mid + 1
        return lo


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    always_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    always_reasoning = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}
