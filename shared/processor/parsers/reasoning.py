"""Reasoning parsers: ``<think>reasoning</think>content`` outputs (or another family's markers)
split into reasoning_content and content, whole or streamed, and the count of reasoning tokens
for usage. The names are vLLM's (``--reasoning-parser``).

Where reasoning starts differs by family: DeepSeek-R1's templates end the prompt with ``<think>``,
so its outputs start inside the reasoning (an opening tag the model writes anyway is dropped);
Qwen3 writes ``<think>`` itself, except when the template opened it in the prompt (the 2507
Thinking models), and writes none at all with enable_thinking false (its template then closes an
empty block in the prompt). So a parser is made per output with the prompt's text, when known:
a prompt that ends in an open start marker starts the output inside the reasoning. Streaming
holds back only a tail that may be the start of a marker, so deltas are the same whatever the
split. Reasoning that never closes (max_tokens reached) is reasoning to the end, in every family.
A family whose answer sits inside a tag pair of its own (ERNIE-4.5's ``<response>``, Hunyuan's
``<answer>``) has those tags dropped from the content, and never streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from shared.processor.parsers.scan import could_become, held_tail
from shared.processor.parsers.types import DeltaMessage, ParsedMessage


class ReasoningParser:
    """Splits one output into reasoning and content (``<think>`` tags unless a family says other
    markers). A family with several spellings of a marker lists them all, the longer first where
    one starts another; the end marker found first wins (so ``\n</think>`` over the ``</think>``
    in it). A family may also wrap its answer in a tag pair (answer_starts, answer_ends): a start
    tag that opens the content, after whitespace, is dropped with that whitespace; the content
    runs to an end tag, which is dropped (with the whitespace after it when the output ends
    there); text after it is content as written. Without the start tag the content is as written."""

    name: ClassVar[str]
    always_reasoning: ClassVar[bool]  # outputs start inside the reasoning whatever the prompt
    starts: ClassVar[tuple[str, ...]] = ("<think>",)
    ends: ClassVar[tuple[str, ...]] = ("</think>",)
    model_opens: ClassVar[bool] = True  # a start marker the output begins with opens the reasoning
    space_before_start: ClassVar[bool] = False  # whitespace before that start marker is dropped with it
    # the markers are special tokens in the family's tokenizer: the detokenizer must keep them
    special_markers: ClassVar[bool] = False
    answer_starts: ClassVar[tuple[str, ...]] = ()
    answer_ends: ClassVar[tuple[str, ...]] = ()

    def __init__(self, prompt: str | None = None) -> None:
        self.prompt = prompt
        in_prompt = prompt is not None and prompt.rstrip().endswith(self.starts)
        opened = self.always_reasoning or in_prompt
        # strip: drop a leading start marker; detect: look for one; content: the output is all content
        # (opening first where the family has answer tags: look for the start tag)
        self._content_phase = "opening" if self.answer_starts else "content"
        self._phase = "strip" if opened else "detect" if self.model_opens else self._content_phase
        self._buffer = ""
        self.reasoned = False  # the output had a reasoning part
        self.start_chars = 0  # length of the start marker (and space before it) the output opened with
        self.closed = False  # the reasoning part ended with an end marker

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
            lead = len(text) - len(text.lstrip()) if self.space_before_start else 0
            rest = text[lead:]
            if not final and any(could_become(rest, start) for start in self.starts):
                return []
            start = next((s for s in self.starts if rest.startswith(s)), "")
            if start:
                text, self.start_chars = rest[len(start):], lead + len(start)
            self.reasoned = self._phase == "strip" or self.start_chars > 0
            self._phase = "reasoning" if self.reasoned else self._content_phase
        if self._phase == "reasoning":
            stop, end = min(((text.find(e), e) for e in self.ends if e in text), default=(-1, ""))
            if stop < 0:
                keep = 0 if final else max(held_tail(text, e) for e in self.ends)
                self._buffer = text[len(text) - keep:]
                return [DeltaMessage(reasoning_content=text[:len(text) - keep])] if len(text) > keep else []
            out = [DeltaMessage(reasoning_content=text[:stop])] if stop else []
            text, self._phase, self.closed = text[stop + len(end):], self._content_phase, True
        self._buffer = ""
        return out + self._content(text, final)

    def _content(self, text: str, final: bool) -> list[DeltaMessage]:
        """The content deltas text resolves, answer tags dropped (a tail that may begin a tag is
        held back in the buffer)."""
        out: list[DeltaMessage] = []
        if self._phase == "opening":
            rest = text.lstrip()
            if not final and (not rest or any(could_become(rest, start) for start in self.answer_starts)):
                self._buffer = text
                return []
            start = next((s for s in self.answer_starts if rest.startswith(s)), "")
            text, self._phase = (rest[len(start):], "answer") if start else (text, "content")
        if self._phase == "answer":
            stop, end = min(((text.find(e), e) for e in self.answer_ends if e in text), default=(-1, ""))
            if stop < 0:
                keep = 0 if final else max(held_tail(text, e) for e in self.answer_ends)
                self._buffer = text[len(text) - keep:]
                text = text[:len(text) - keep]
            else:
                out = [DeltaMessage(content=text[:stop])] if stop else []
                text, self._phase = text[stop + len(end):], "closing"
        if self._phase == "closing":  # whitespace after the end tag is dropped if the output ends there
            if text.strip():
                self._phase = "content"
            else:
                self._buffer, text = ("" if final else text), ""
        return out + ([DeltaMessage(content=text)] if text else [])

    def count_reasoning_tokens(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int:
        """The output tokens spent reasoning, for usage's completion_tokens_details: those after an
        opening start marker and before the token that completes the end marker (all to the end
        when it never does). decode turns token ids into text (the detokenizer's way); it is called
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


class DeepSeekV3ReasoningParser(ReasoningParser):
    """DeepSeek-V3.1: its template ends the prompt with ``<think>`` when thinking is on and with
    ``</think>`` when off (the default). vLLM reads the thinking switch from chat_template_kwargs;
    here the prompt tells it: reasoning only when the prompt opened the block, all content
    otherwise (a ``<think>`` the output writes itself is content)."""

    name = "deepseek_v3"
    always_reasoning = False
    model_opens = False


class Glm45ReasoningParser(ReasoningParser):
    """GLM-4.5/4.6: the model writes ``<think>`` itself, after the newline its template puts
    there (``<|assistant|>\n<think>...``); enable_thinking false ends the prompt with an empty
    ``<think></think>``. Unlike qwen3, whitespace before the opening tag is dropped with it.
    GLM-4.7's template opens ``<think>`` in the prompt, which starts the output inside."""

    name = "glm45"
    always_reasoning = False
    space_before_start = True


class MiniMaxM2ReasoningParser(ReasoningParser):
    """MiniMax-M2: its template always ends the prompt with ``<think>\n``, so the output starts
    inside the reasoning (as deepseek_r1)."""

    name = "minimax_m2"
    always_reasoning = True


class MistralReasoningParser(ReasoningParser):
    """Magistral: ``[THINK]...[/THINK]``, written by the model itself (its system prompt asks for
    them); no ``[THINK]`` means no reasoning. They are special tokens, so the text must be
    decoded with skip_special_tokens false for them to be seen."""

    name = "mistral"
    always_reasoning = False
    starts, ends = ("[THINK]",), ("[/THINK]",)
    special_markers = True


class SeedOssReasoningParser(ReasoningParser):
    """ByteDance Seed-OSS: ``<seed:think>...</seed:think>``, written by the model itself; with
    thinking_budget 0 the template closes a short block in the prompt, and the output is content."""

    name = "seed_oss"
    always_reasoning = False
    starts, ends = ("<seed:think>",), ("</seed:think>",)


class GraniteReasoningParser(ReasoningParser):
    """IBM Granite 3.2 (thinking on): plain text, "Here is my thought process:" at the start of
    the output, then "Here is my response:"; each also as "Here's" (seen from quantized models)."""

    name = "granite"
    always_reasoning = False
    starts = ("Here is my thought process:", "Here's my thought process:")
    ends = ("Here is my response:", "Here's my response:")


class Ernie45ReasoningParser(ReasoningParser):
    """ERNIE-4.5 Thinking: ``reasoning\n</think>\n\n<response>\nanswer\n</response>\n``; the
    template opens the reasoning, so the output starts inside it (as deepseek_r1). The answer is
    what the response tags hold, newlines kept as vLLM keeps them; a tool call follows
    ``</think>`` without them and is content as written."""

    name = "ernie45"
    always_reasoning = True
    answer_starts, answer_ends = ("<response>",), ("</response>",)


class HunyuanA13BReasoningParser(ReasoningParser):
    """Hunyuan-A13B: ``<think>\nreasoning\n</think>\n<answer>\nanswer\n</answer>``, written by
    the model itself (an empty block when it does not think, /no_think); its tool calls sit inside
    the answer. As in vLLM, the newline just inside each tag belongs to the tag; an output without
    ``<think>`` is content."""

    name = "hunyuan_a13b"
    always_reasoning = False
    starts, ends = ("<think>\n", "<think>"), ("\n</think>", "</think>")
    answer_starts, answer_ends = ("<answer>\n", "<answer>"), ("\n</answer>", "</answer>")


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (
        DeepSeekR1ReasoningParser, Qwen3ReasoningParser, DeepSeekV3ReasoningParser, Ernie45ReasoningParser,
        Glm45ReasoningParser, GraniteReasoningParser, HunyuanA13BReasoningParser, MiniMaxM2ReasoningParser,
        MistralReasoningParser, SeedOssReasoningParser,
    )
}
