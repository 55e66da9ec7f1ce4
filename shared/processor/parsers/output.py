"""Reasoning and tool-call parsing chained, as a chat completion's output needs them: the
reasoning parser splits the text first, and the tool parser reads only the content after the
reasoning. Made per output (one per choice); either parser may be absent."""

from __future__ import annotations

from shared.processor.parsers.reasoning import ReasoningParser
from shared.processor.parsers.tool_parser import ToolParser
from shared.processor.parsers.types import DeltaMessage, ParsedMessage


class OutputParser:
    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None) -> None:
        self.reasoning, self.tools = reasoning, tools

    @property
    def called(self) -> bool:
        """The output made tool calls so far (finish_reason "tool_calls")."""
        return bool(self.tools and self.tools.calls)

    def feed(self, delta: str) -> list[DeltaMessage]:
        """The deltas (reasoning, content, tool calls) the next piece of text resolves."""
        if self.reasoning is None:
            return self._content([DeltaMessage(content=delta)], final=False)
        return self._content(self.reasoning.feed(delta), final=False)

    def finish(self) -> list[DeltaMessage]:
        """The deltas left at the end of the output."""
        return self._content(self.reasoning.finish() if self.reasoning else [], final=True)

    def extract(self, text: str) -> ParsedMessage:
        """A whole output parsed; the parser is used up (make one per output)."""
        return ParsedMessage.from_deltas(self.feed(text) + self.finish())

    def _content(self, deltas: list[DeltaMessage], final: bool) -> list[DeltaMessage]:
        """Route the content deltas through the tool parser, in order."""
        if self.tools is None:
            return [d for d in deltas if d.content or d.reasoning_content]
        out: list[DeltaMessage] = []
        for delta in deltas:
            if delta.reasoning_content:
                out.append(DeltaMessage(reasoning_content=delta.reasoning_content))
            if delta.content:
                out += self.tools.feed(delta.content)
        return out + (self.tools.finish() if final else [])
