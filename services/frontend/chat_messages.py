"""Chat messages and a client's own chat template, as chat completions and /tokenize take them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from services.frontend.request_body import STRICT as _STRICT


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # templates may use tool_calls etc.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        out = dict(self.model_extra or {})
        out["role"] = self.role
        if isinstance(self.content, list):
            out["content"] = "\n".join(part.text for part in self.content)
        else:
            out["content"] = self.content or ""
        if self.name is not None:
            out["name"] = self.name
        return out


class ClientTemplate(BaseModel):
    """A chat template sent by the client: vLLM's `chat_template` field, or the same key in
    `chat_template_kwargs` (the rest of which become template variables)."""

    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_template(self) -> ClientTemplate:
        nested = (self.chat_template_kwargs or {}).get("chat_template")
        if nested is not None and not isinstance(nested, str):
            raise ValueError("chat_template_kwargs must hold chat_template as a string")
        return self

    @property
    def client_template(self) -> str | None:
        return self.chat_template if self.chat_template is not None else (self.chat_template_kwargs or {}).get(
            "chat_template")
