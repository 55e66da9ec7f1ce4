"""Chat requests with tools and reasoning, the same for the HTTP frontend and the offline LLM.

ChatParsers is the server's choice of parsers (``--tool-call-parser``, ``--reasoning-parser``,
``--enable-auto-tool-choice``; LLM.chat's arguments offline). ChatPlan checks one request's tool
fields and says what they change: the template's ``tools`` variable, the structured-output
constraint that forces calls (tool_choice "required" or named), and the per-choice parser.
ChatOutput parses one choice's text, streamed or whole, into reasoning, content and tool calls.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from msgspec.structs import replace

from shared.processor.errors import InvalidRequest
from shared.processor.parsers import get_reasoning_parser, get_tool_parser
from shared.processor.parsers.forced import ForcedCallsParser, forced_calls_schema
from shared.processor.parsers.output import OutputParser
from shared.processor.parsers.types import DeltaMessage, ParsedMessage
from shared.processor.parsers.validation import check_tool_choice, check_tool_messages, check_tools
from shared.processor.sequence import Sequence
from shared.sampling_params import SamplingParams, StructuredOutputsParams

_PROMPT_TAIL_TOKENS = 8  # enough of the prompt's end to see whether it opened a <think> block


@dataclass(frozen=True)
class ChatParsers:
    """Which parsers read chat outputs; a name that is not registered raises ValueError listing the names."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise InvalidRequest("enable_auto_tool_choice needs a tool call parser", "tool_call_parser")


class ChatPlan:
    """One chat request's tools, tool_choice and parsers, checked (InvalidRequest naming the field)."""

    def __init__(self, parsers: ChatParsers, messages: list[dict[str, Any]], tools: Any = None,
                 tool_choice: Any = None, parallel_tool_calls: Any = None):
        check_tool_messages(messages)
        self.parsers = parsers
        self.tools = check_tools(tools)
        self.tool_choice = check_tool_choice(tool_choice, self.tools, parallel_tool_calls)
        self.parallel_tool_calls = parallel_tool_calls is not False
        self.forced = self.tool_choice == "required" or isinstance(self.tool_choice, dict)
        self.auto = self.tool_choice == "auto" and bool(self.tools)
        if self.auto and not (parsers.enable_auto_tool_choice and parsers.tool_call_parser):
            raise InvalidRequest('tool_choice "auto" needs a tool call parser: --enable-auto-tool-choice and '
                                 "--tool-call-parser NAME on the server (LLM.chat's tool_parser offline)",
                                 "tool_choice")

    def template_variables(self, kwargs: dict[str, Any] | None, continue_final_message: bool = False) -> dict[str, Any]:
        """chat_template_kwargs plus the request's tools, as apply_chat_template takes them;
        continue_final_message (vLLM's): the last message stays open for the model to continue
        (apply_chat_template refuses it with add_generation_prompt)."""
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidRequest(f"chat_template_kwargs must be a dict of template variables, got {kwargs!r}",
                                 "chat_template_kwargs")
        variables = dict(kwargs or {})
        if continue_final_message:
            variables["continue_final_message"] = True
        if self.tools:
            variables["tools"] = [tool.to_openai() for tool in self.tools]
        return variables

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """params with the constraint that forces calls, and the special tokens the tool or
        reasoning parser's markers are kept in the text."""
        if self.forced:
            if params.structured_outputs is not None:
                raise InvalidRequest("tool_choice 'required' or a named function cannot be combined with "
                                     "response_format or structured outputs", "tool_choice")
            schema = forced_calls_schema(self.tools, self.tool_choice, self.parallel_tool_calls)
            return replace(params, structured_outputs=StructuredOutputsParams(json=schema))
        reasoning = self.parsers.reasoning_parser
        if ((self.auto and get_tool_parser(self.parsers.tool_call_parser).special_markers)
                or (reasoning is not None and get_reasoning_parser(reasoning).special_markers)):
            return replace(params, skip_special_tokens=False)
        return params

    def output(self, seq: Sequence, tokenizer: Any) -> ChatOutput:
        """The parsing of one choice (one per Sequence)."""
        reasoning = None
        if self.parsers.reasoning_parser is not None and not self.forced:  # forced output is JSON alone
            tail = tokenizer.decode(seq.prompt_token_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            reasoning = get_reasoning_parser(self.parsers.reasoning_parser)(tail)
        tools = None
        if self.forced:
            tools = ForcedCallsParser()
        elif self.auto:
            tools = get_tool_parser(self.parsers.tool_call_parser)(self.tools)
        parser = OutputParser(reasoning, tools) if reasoning or tools else None
        return ChatOutput(seq, tokenizer, parser)


class ChatOutput:
    """One choice's output split into reasoning, content and tool calls. Either stream it
    (``stream`` with each new piece of text) or take it whole (``message``), not both."""

    def __init__(self, seq: Sequence, tokenizer: Any, parser: OutputParser | None):
        self.seq, self.tokenizer, self.parser = seq, tokenizer, parser
        self._finished = False

    def stream(self, text: str) -> list[DeltaMessage]:
        """The deltas this new text resolves; once the sequence has finished, the rest too."""
        if self.parser is None:
            return [DeltaMessage(content=text)] if text else []
        out = self.parser.feed(text) if text else []
        if self.seq.finished and not self._finished:
            self._finished = True
            out += self.parser.finish()
        return out

    def message(self) -> ParsedMessage:
        """The whole output parsed (content is the text as is without a parser)."""
        if self.parser is None:
            return ParsedMessage(content=self.seq.text)
        return self.parser.extract(self.seq.text)

    @property
    def finish_reason(self) -> str | None:
        """The sequence's finish reason, "tool_calls" when it stopped after making calls."""
        reason = self.seq.finish_reason
        return "tool_calls" if reason == "stop" and self.parser is not None and self.parser.called else reason

    def reasoning_tokens(self) -> int:
        """Output tokens spent reasoning (usage's completion_tokens_details)."""
        if self.parser is None or self.parser.reasoning is None:
            return 0
        skip = self.seq.params.skip_special_tokens

        def decode(ids: Seq[int]) -> str:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip)

        return self.parser.reasoning.count_reasoning_tokens(self.seq.token_ids, decode)
