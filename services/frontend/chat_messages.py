"""Chat messages and a client's own chat template, as chat completions and /tokenize take them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from services.frontend.request_body import NESTED_ERROR
from services.frontend.request_body import STRICT as _STRICT

# content parts of other models (OpenAI's and vLLM's multimodal ones): named in the 400
_NOT_TEXT = {"image_url": "image", "input_image": "image", "image": "image", "image_embeds": "image",
             "input_audio": "audio", "audio_url": "audio", "audio": "audio", "video_url": "video", "video": "video",
             "file": "file", "input_file": "file"}


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class RefusalPart(BaseModel):
    """An assistant's refusal sent back in a conversation: text to the template, as in vLLM."""

    model_config = _STRICT
    type: Literal["refusal"]
    refusal: str


def _part_problem(part: Any) -> tuple[str, str] | None:
    """(place within the part, what is wrong) when this text-only model cannot take ``part``."""
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        return "", "a content part must be an object with a 'type' (\"text\")"
    if kind in _NOT_TEXT:
        return ".type", (f"{_NOT_TEXT[kind]} content ('{kind}' parts) is not supported: this model takes text only; "
                         "send the text as a string or in parts of type 'text'")
    if kind not in ("text", "refusal"):
        return ".type", f"unknown content part type '{kind}': this model takes parts of type 'text'"
    if not isinstance(part.get(kind), str):
        return f".{kind}", f"a '{kind}' part needs '{kind}' as a string"
    return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # templates may use tool_calls etc.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """A 400 that names the part this text-only model cannot take, and why."""
        if content is not None and not isinstance(content, (str, list)):
            raise PydanticCustomError(NESTED_ERROR, "{problem}", {"below": "", "problem": (
                "content must be a string or a list of content parts")})
        for i, part in enumerate(content if isinstance(content, list) else ()):
            if (found := _part_problem(part)) is not None:
                raise PydanticCustomError(NESTED_ERROR, "{problem}", {"below": f"[{i}]{found[0]}", "problem": found[1]})
        return content

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        out = dict(self.model_extra or {})
        out["role"] = self.role
        if isinstance(self.content, list):
            out["content"] = "\n".join(part.text if isinstance(part, TextPart) else part.refusal
                                       for part in self.content)
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
