"""POST /v1/responses bodies, turned into the chat request the chat machinery already serves:
instructions become a system message, input items become messages (function calls an
assistant's tool_calls, function call outputs tool messages), function tools and tool_choice
take chat's shape, text.format becomes response_format, reasoning.effort the template's
reasoning_effort."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from services.frontend.errors import bad_request
from services.frontend.openai_requests import ChatCompletionRequest
from services.frontend.request_body import RequestBody


class Reasoning(RequestBody):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    background: bool = False  # run on after the answer; polled with GET, stopped with /cancel
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    seed: int | None = None  # vLLM's extras, as in chat
    chat_template_kwargs: dict[str, Any] | None = None

    def input_items(self) -> list[dict[str, Any]]:
        """The input as the items GET /v1/responses/{id}/input_items lists, each with an id."""
        items = [{"type": "message", "role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        out = []
        for item in items:
            item = {"type": "message", **item}
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(item["type"], "item")
            out.append({"id": f"{prefix}_{uuid.uuid4().hex}", **item})
        return out

    def input_messages(self) -> list[dict[str, Any]]:
        """The input as chat messages (400 naming the item for one of an unknown shape)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
                messages.append({"role": item["role"], "content": _text(item.get("content"), f"input[{i}].content")})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": output if isinstance(output, str) else _text(output, f"input[{i}].output")})
            elif kind != "reasoning":  # reasoning items of earlier turns are not shown to the model again
                raise bad_request(f"Invalid value for 'input[{i}]': unsupported item type {kind!r}.", f"input[{i}]")
        return messages

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat completion this response runs (its checks and defaults are chat's)."""
        if not messages:  # named as this API names it, not as chat's 'messages'
            raise bad_request("Invalid value for 'input': there is nothing to respond to (no message, no "
                              "instructions and no previous_response_id).", "input")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "n": 1}
        for name in ("temperature", "top_p", "seed", "parallel_tool_calls", "chat_template_kwargs"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools is not None:
            body["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(self.tools)]
        if isinstance(self.tool_choice, dict):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.get("name")}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            body["response_format"] = {"type": "json_object"}
        return ChatCompletionRequest.model_validate(body, strict=False)


def _text(content: Any, param: str) -> str:
    """A message's content as text: a string, or its input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request(f"Invalid value for '{param}': expected a string or a list of text parts.", param)


def _chat_tool(tool: Any, param: str) -> dict[str, Any]:
    """A Responses function tool ({type, name, description, parameters}) in chat's shape."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"Invalid value for '{param}.type': only function tools are supported.", f"{param}.type")
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}
