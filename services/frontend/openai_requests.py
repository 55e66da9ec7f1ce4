"""OpenAI request bodies (completions, chat completions) plus vLLM's extras.

Strict pydantic models: a wrong type is a 400 naming the parameter, never a silent coercion.
Ranges that OpenAI documents are checked here; SamplingParams checks the rest when the request
is turned into engine parameters. Unknown fields are ignored, as clients send newer ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.frontend.chat_messages import ChatMessage, ClientTemplate
from services.frontend.request_body import STRICT as _STRICT
from services.frontend.request_body import RequestBody
from shared.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

MAX_REQUEST_ID_CHARS = 256  # as an X-Request-Id header (middleware.py)
MAX_DOCUMENTS = 1024  # chat's documents, each a dict of strings for a RAG template

# Request fields that map one to one onto SamplingParams, when the client sets them.
_DIRECT_FIELDS = (
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "allowed_token_ids",
    "bad_words",
    "truncate_prompt_tokens",
)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a BaseModel method
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema must be given exactly when type is json_schema")
        return self


class SamplingRequest(RequestBody):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1)  # the frontend's --max-n caps it
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None  # SamplingParams and the processor check these three
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs / guided_* extras
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    priority: int = 0  # vLLM's extra: with the engine's priority policy, lower runs first
    # vLLM's extras: the answer's id ("cmpl-" or "chatcmpl-" and this, unless an X-Request-Id header
    # gives one; never the engine's id), and the prompt's and each choice's token ids in the answer
    request_id: str | None = Field(None, max_length=MAX_REQUEST_ID_CHARS)
    return_token_ids: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value}")
        return bias

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids and min(ids) < 0:
            raise ValueError("token ids must be non-negative")
        return ids

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field the client set max_tokens with (for errors)."""
        return "max_tokens"

    def logprob_requests(self) -> dict[str, int]:
        """Each logprobs count the client asked for, by field."""
        raise NotImplementedError

    def _requested_logprobs(self) -> int | None:
        raise NotImplementedError

    def _requested_prompt_logprobs(self) -> int | None:
        return None

    def to_sampling_params(self) -> SamplingParams:
        """The fields the request sets, as SamplingParams (the processor merges the model's
        defaults into the rest). Raises ValueError for an invalid combination."""
        set_fields = self.model_fields_set
        overrides: dict[str, Any] = {
            f: getattr(self, f) for f in _DIRECT_FIELDS if f in set_fields and getattr(self, f) is not None
        }
        if self.stop is not None:
            overrides["stop"] = self.stop
        if self.logit_bias:
            overrides["logit_bias"] = self.logit_bias
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None:
            overrides["max_tokens"] = max_tokens
        logprobs = self._requested_logprobs()
        if logprobs is not None:
            overrides["logprobs"] = logprobs
        prompt_logprobs = self._requested_prompt_logprobs()
        if prompt_logprobs is not None:
            overrides["prompt_logprobs"] = prompt_logprobs
        structured = self._structured_outputs()
        if structured is not None:
            overrides["structured_outputs"] = structured
        return SamplingParams(**overrides)

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one output constraint the request sets (ValueError when it sets several)."""
        given = {}
        if self.response_format is not None and self.response_format.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif self.response_format is not None and self.response_format.type == "json_schema":
            given["response_format"] = {"json": self.response_format.json_schema.json_schema}
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs
        for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                given[field] = {key: getattr(self, field)}
        if len(given) > 1:
            raise ValueError(f"structured_outputs must be the only output constraint, got {', '.join(given)}")
        if not given:
            return None
        try:
            return StructuredOutputsParams(**next(iter(given.values())))
        except TypeError as exc:  # an unknown key in structured_outputs
            raise ValueError(f"structured_outputs has an unknown field: {exc}") from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's extra
    add_special_tokens: bool = True  # vLLM's extra: the tokenizer adds BOS etc. to text prompts

    @model_validator(mode="after")
    def _check_supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n when given)")
        return self

    def _requested_logprobs(self) -> int | None:
        return self.logprobs

    def logprob_requests(self) -> dict[str, int]:
        asked = {"logprobs": self.logprobs, "prompt_logprobs": self.prompt_logprobs}
        return {k: v for k, v in asked.items() if v is not None}

    @property
    def num_prompts(self) -> int:
        """How many prompts the request holds (a list of strings or of token-id lists)."""
        if isinstance(self.prompt, str) or all(isinstance(p, int) for p in self.prompt):
            return 1
        return len(self.prompt)

    @property
    def scores_prompt(self) -> bool:
        """Whether the engine scores the prompt: prompt_logprobs, or echo with logprobs."""
        return self._requested_prompt_logprobs() is not None

    def _requested_prompt_logprobs(self) -> int | None:
        """prompt_logprobs as given; echo with logprobs scores the echoed prompt the same way."""
        if self.prompt_logprobs is not None:
            return max(self.prompt_logprobs, self.logprobs or 0) if self.echo else self.prompt_logprobs
        return self.logprobs if self.echo else None


class ChatCompletionRequest(SamplingRequest, ClientTemplate):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's extra: the last (assistant) message is continued
    # vLLM's extras: the answer starts with the last message's content when that message has the
    # answer's role; special tokens on top of the template's; documents for RAG templates
    echo: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = Field(None, max_length=MAX_DOCUMENTS)
    # OpenAI's field; a template variable (gpt-oss-style templates read it), chat_template_kwargs' own wins
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # tool calling: checked (with the tool messages) by shared.processor.chat.ChatPlan
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_kwargs(self) -> dict[str, Any] | None:
        """chat_template_kwargs, with reasoning_effort and documents among them when given (the
        kwargs' own win, as in vLLM)."""
        given = {k: v for k, v in (("reasoning_effort", self.reasoning_effort), ("documents", self.documents))
                 if v is not None}
        if not given:
            return self.chat_template_kwargs
        return {**given, **(self.chat_template_kwargs or {})}

    def reply_role(self, response_role: str) -> str:
        """The answer's role (vLLM's rule): the server's with a generation prompt, otherwise the
        last message's, which the model writes on."""
        return response_role if self.add_generation_prompt else self.messages[-1].role

    def echoed(self, response_role: str) -> str:
        """With echo, the text the answer starts with: the last message's content when it has
        the answer's role (vLLM's rule), else nothing."""
        last = self.messages[-1]
        if not self.echo or last.role != self.reply_role(response_role):
            return ""
        return last.to_template()["content"]

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def _requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def logprob_requests(self) -> dict[str, int]:
        return {"top_logprobs": self.top_logprobs} if self.top_logprobs is not None else {}

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]
