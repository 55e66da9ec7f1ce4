"""OpenAI response bodies and streaming chunks (completions, chat completions, models), plus
/tokenize and /detokenize answers and the SSE framing.

Streamed chunks skip pydantic: each stream serializes its envelope (id, object, created, model)
once, and each chunk encodes only its choice, a plain dict, with msgspec."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, Field

from shared.processor import outcome
from shared.processor.parsers.types import ParsedMessage


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_id(prefix: str, given: str | None) -> str:
    """An answer's id, vLLM's way: the client's request id after the prefix, or a random one."""
    return f"{prefix}-{given}" if given else random_id(prefix)


def now() -> int:
    return int(time.time())


def _model_fields(obj: Any) -> Any:
    """Models inside a chunk (logprobs, a prompt's choice) as the fields they were given; JSON
    has no infinity, so msgspec writes a non-finite float as null, as pydantic does."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(exclude_unset=True)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


_encode = msgspec.json.Encoder(enc_hook=_model_fields).encode
SSE_DONE = b"data: [DONE]\n\n"


class ChunkStream:
    """The SSE events of one stream: chunks that share an id, object, created and model."""

    def __init__(self, chunk_id: str, obj: str, model: str, include_usage: bool):
        envelope = _encode({"id": chunk_id, "object": obj, "created": now(), "model": model})
        self._head = b"data: " + envelope[:-1] + b',"choices":['
        # with include_usage every chunk carries "usage": null until the last, which has it
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: dict[str, Any] | BaseModel, extra: dict[str, Any] | None = None) -> bytes:
        """A chunk with this one choice (and ``extra`` fields beside the choices, e.g. chat's
        prompt_token_ids)."""
        if not extra:
            return self._head + _encode(choice) + self._tail
        return self._head + _encode(choice) + b"]," + _encode(extra)[1:-1] + self._tail[1:]

    def usage(self, usage: Usage) -> bytes:
        """The last chunk of include_usage: no choices, the request's token counts."""
        return self._head + b'],"usage":' + _encode(usage) + b"}\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """An error reported in-band once the stream's headers are out."""
    return b"data: " + _encode(body) + b"\n\n"


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, usage: outcome.Usage, reasoning_tokens: int | None = None) -> Usage:
        """The processor's usage in OpenAI's shape (with the reasoning tokens, when counted)."""
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens, completion_tokens_details=details)


# ----- completions ------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's extra: the stop token id or string
    # vLLM's extra, with prompt_logprobs: None for the first prompt token, then token id -> logprob
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    # vLLM's extras, with return_token_ids: the choice's prompt and the tokens it generated
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# ----- chat completions -------------------------------------------------------------------------


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"  # the server's --response-role
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # vLLM's field, and its newer name `reasoning`
    reasoning: str | None = None

    @classmethod
    def of(cls, message: ParsedMessage) -> ChatMessageOut:
        """A parsed output as the assistant's message."""
        calls = [call.to_openai() for call in message.tool_calls] or None
        return cls(content=message.content, tool_calls=calls, reasoning_content=message.reasoning_content,
                   reasoning=message.reasoning_content)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's extra, with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's extra, with return_token_ids


# ----- models, tokenizer ------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int
    task: str = "generate"  # what the model does: generate, embed (embeddings) or classify (scores)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
