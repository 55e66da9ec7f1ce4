"""Bodies of vLLM's tokenizer endpoints: /tokenize (a prompt, or chat messages) and /detokenize."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.frontend.chat_messages import ChatMessage, ClientTemplate
from services.frontend.request_body import RequestBody


class TokenizeRequest(RequestBody, ClientTemplate):
    """/tokenize: a prompt, or chat messages rendered with the model's template (not both)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages must be given (exactly one of them)")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]
