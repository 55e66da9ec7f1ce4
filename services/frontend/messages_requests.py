"""POST /v1/messages bodies (Anthropic's Messages API), turned into the chat request the chat
machinery already serves: system becomes a system message, text blocks content parts, an
assistant's tool_use blocks its tool_calls, a user's tool_result blocks tool messages; tools
({name, description, input_schema}) and tool_choice (auto, any, tool, none) take chat's shape,
stop_sequences become stop. A conversation that ends with the assistant's text is continued
(Anthropic's prefill), as chat's continue_final_message does."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from services.frontend.errors import bad_request
from services.frontend.openai_requests import ChatCompletionRequest
from services.frontend.request_body import NESTED_ERROR, STRICT, RequestBody

_NOT_TEXT = ("image", "document", "search_result", "container_upload")
_MESSAGE_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _problem(below: str, problem: str) -> PydanticCustomError:
    return PydanticCustomError(NESTED_ERROR, "{problem}", {"below": below, "problem": problem})


def _blocks(content: Any, kinds: tuple[str, ...] = ("text",), below: str = "") -> Any:
    """Content as a list of blocks (a string is one text block); a 400 that names the block this
    text-only model, or this place, cannot take (a tool_result's own blocks too)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _problem(below, "content must be a string or a list of content blocks")
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise _problem(f"{below}[{i}]", "a content block must be an object with a 'type'")
        if kind in _NOT_TEXT:
            raise _problem(f"{below}[{i}].type", f"'{kind}' blocks are not supported: this model takes text only; "
                           "send the text as a string or in blocks of type 'text'")
        if kind not in kinds:
            raise _problem(f"{below}[{i}].type", f"unknown content block type '{kind}' here: expected one of "
                           f"{', '.join(kinds)}")
        if kind == "tool_result" and "content" in block:
            _blocks(block["content"], below=f"{below}[{i}].content")
    return content


def untagged(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors whose places leave out the block type pydantic puts after a block's
    index ('messages[0].content[1].text', not '...content[1].text.text')."""
    out = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        loc = tuple(part for i, part in enumerate(loc)
                    if not (i and isinstance(loc[i - 1], int) and part in _MESSAGE_BLOCKS))
        out.append({**error, "loc": loc})
    return out


class TextBlock(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: list[TextBlock] = []
    is_error: bool = False  # kept on the tool message, for templates that read it

    @field_validator("content", mode="before")
    @classmethod
    def _text_blocks(cls, content: Any) -> Any:
        return _blocks(content)


class ThinkingBlock(BaseModel):
    """An earlier turn's thinking: accepted, not shown to the model again."""

    model_config = STRICT
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant"]
    content: list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content: Any) -> Any:
        return _blocks(content, _MESSAGE_BLOCKS)


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["custom"] | None = None  # Anthropic's server tools (web search, bash, ...) are not served
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(BaseModel):
    model_config = STRICT
    user_id: str | None = None


class MessageCountRequest(RequestBody):
    """The body of /v1/messages/count_tokens: a message request without max_tokens."""


    model: str
    messages: list[Message] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_blocks(cls, content: Any) -> Any:
        return None if content is None else _blocks(content)

    def chat_request(self, max_tokens: int | None = None, **sampling: Any) -> ChatCompletionRequest:
        """The chat completion this request runs (its checks and defaults are chat's)."""
        messages = self.chat_messages()
        prefill = bool(messages) and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "n": 1, "max_tokens": max_tokens,
                                "add_generation_prompt": not prefill, "continue_final_message": prefill,
                                **{k: v for k, v in sampling.items() if v is not None}}
        if self.tools is not None:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema,
                **({"description": t.description} if t.description is not None else {})}} for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool" and choice.name is None:
                raise bad_request("Invalid value for 'tool_choice.name': a tool choice of type 'tool' names the "
                                  "tool.", "tool_choice.name")
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
                "type": "function", "function": {"name": choice.name}}
            if choice.disable_parallel_tool_use is not None:
                body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        return ChatCompletionRequest.model_validate(body, strict=False)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (400 naming the block for one out of place)."""
        system = [p.model_dump() for p in self.system or () if p.text]
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        call_ids: set[str] = set()
        for i, message in enumerate(self.messages):
            texts: list[dict[str, str]] = []
            calls: list[dict[str, Any]] = []
            for j, block in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(block, TextBlock):
                    texts.append(block.model_dump())
                elif isinstance(block, ToolUseBlock):
                    _check_place(message.role, "assistant", block.type, where)
                    if block.id in call_ids:
                        raise bad_request(f"Invalid value for '{where}.id': the tool_use id {block.id!r} is "
                                          "given twice.", f"{where}.id")
                    call_ids.add(block.id)
                    calls.append({"id": block.id, "type": "function", "function": {
                        "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
                elif isinstance(block, ToolResultBlock):
                    _check_place(message.role, "user", block.type, where)
                    if block.tool_use_id not in call_ids:
                        raise bad_request(f"Invalid value for '{where}.tool_use_id': {block.tool_use_id!r} answers "
                                          "no tool_use block of an earlier assistant message.", f"{where}.tool_use_id")
                    out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                "content": [p.model_dump() for p in block.content],
                                **({"is_error": True} if block.is_error else {})})
            if message.role == "assistant" and (texts or calls):
                out.append({"role": "assistant", "content": texts, **({"tool_calls": calls} if calls else {})})
            elif texts:
                out.append({"role": "user", "content": texts})
        if all(m["role"] == "system" for m in out):
            raise bad_request("Invalid value for 'messages': no message has a text, tool_use or tool_result block "
                              "to answer (thinking blocks are not shown to the model).", "messages")
        return out


def _check_place(role: str, wanted: str, kind: str, where: str) -> None:
    if role != wanted:
        raise bad_request(f"Invalid value for '{where}.type': '{kind}' blocks belong in {wanted} messages.",
                          f"{where}.type")


class MessagesRequest(MessageCountRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False

    def run_request(self) -> ChatCompletionRequest:
        """The chat completion that generates this message."""
        return self.chat_request(self.max_tokens, stop=self.stop_sequences, temperature=self.temperature,
                                 top_p=self.top_p, top_k=self.top_k)
