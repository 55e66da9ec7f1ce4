"""Anthropic's Messages API: POST /v1/messages (whole, or streamed as Anthropic's SSE events) and
/v1/messages/count_tokens. A message runs as the chat completion its body makes
(messages_requests), through chat's plan, generation and parsers; one writer builds its content
blocks (thinking, text, tool_use) from the parsed deltas and also makes the stream's events, so
whole and streamed answers agree. Errors take Anthropic's shape ({"type": "error", "error":
{"type", "message"}})."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from services.frontend.errors import APIError, validation_error
from services.frontend.generation import ClientDisconnected, Generation
from services.frontend.messages_requests import MessageCountRequest, MessagesRequest
from services.frontend.openai_requests import ChatCompletionRequest
from services.frontend.response_events import deltas_of
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, stream
from shared.processor.chat import ChatOutput, ChatPlan
from shared.processor.parsers.types import DeltaMessage
from shared.processor.sequence import Sequence

log = logging.getLogger(__name__)
ENDPOINT = "/v1/messages"
_encode = msgspec.json.Encoder().encode
# chat's names for the fields, as this API names them
_RENAMES = ((re.compile(r"(tools\[\d+\])\.function\.parameters"), r"\1.input_schema"),
            (re.compile(r"(tools\[\d+\])\.function\b"), r"\1"),
            (re.compile(r"tool_choice\.function\.name"), "tool_choice.name"))


def error_body(exc: APIError) -> dict[str, Any]:
    """The error in Anthropic's shape."""
    return exc.anthropic_body()


def error_response(exc: APIError) -> JSONResponse:
    return exc.response(ENDPOINT)


def _event(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode({"type": kind, **fields}) + b"\n\n"


def _renamed(exc: APIError) -> APIError:
    """A chat error with the fields named as this API names them."""
    for pattern, name in _RENAMES:
        exc.message = pattern.sub(name, exc.message)
        exc.param = pattern.sub(name, exc.param) if exc.param else exc.param
    if exc.param == "stop":
        exc.param, exc.message = "stop_sequences", re.sub(r"\bstop\b", "stop_sequences", exc.message, count=1)
    return exc


async def _prompt(state: FrontendState, chat_of: Callable[[], ChatCompletionRequest],
                  check_fits: bool) -> tuple[ChatCompletionRequest, ChatPlan, list[int]]:
    """The chat request a body makes, its plan and its prompt's token ids (400s named as here)."""
    state.require_ready()
    try:
        chat = chat_of()
        state.check_limits(chat)
        messages = chat.template_messages()
        plan = state.chat_plan(messages, chat.tools, chat.tool_choice, chat.parallel_tool_calls)
        variables = plan.template_variables(None, chat.continue_final_message)
        ids = await state.encode_chat(messages, chat.add_generation_prompt, template_kwargs=variables,
                                      check_fits=check_fits)
    except ValidationError as exc:
        raise _renamed(validation_error(exc.errors())) from None
    except APIError as exc:
        raise _renamed(exc) from None
    return chat, plan, ids


async def create_message(state: FrontendState, body: MessagesRequest, request: Request) -> Response:
    arrival = time.monotonic()
    model = state.check_model(body.model)
    state.check_endpoint(ENDPOINT)
    chat, plan, ids = await _prompt(state, body.run_request, check_fits=True)
    try:
        state.check_prompt(ids, "messages")
        params = state.sampling_params(chat, None, [ids], "messages", plan)
    except APIError as exc:
        raise _renamed(exc) from None
    gen = state.generation([ids], params, ENDPOINT, arrival, model=model)
    writer = MessageWriter(gen, plan.output(gen.ordered()[0], state.tokenizer), model, body.stop_sequences or [])
    if body.stream:
        return await stream(gen, request, writer.events)
    return await respond_whole(gen, request, writer.whole)


async def count_message_tokens(state: FrontendState, body: MessageCountRequest) -> JSONResponse:
    """The prompt's length in tokens, with no context check (clients count long texts with it;
    the body cap bounds the work)."""
    state.check_model(body.model)
    state.check_endpoint(f"{ENDPOINT}/count_tokens")  # a pooling model's refusal, not a missing chat template
    _, _, ids = await _prompt(state, body.chat_request, check_fits=False)
    return JSONResponse({"input_tokens": len(ids)})


class MessageWriter:
    """One message being made: its content blocks, built from the parsed deltas of its choice,
    and the SSE events that stream them (a block starts, its text or JSON streams in deltas, it
    stops; a delta of another kind stops the open block first)."""

    def __init__(self, gen: Generation, output: ChatOutput, model: str, stop_sequences: list[str]):
        self.gen, self.output, self.stop_sequences = gen, output, stop_sequences
        self.message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(output.seq.prompt_token_ids), "output_tokens": 0}}
        self._open: dict[str, Any] | None = None
        self._json = ""  # the open tool_use block's input so far

    def whole(self, seqs: list[Sequence]) -> Response:
        for delta in deltas_of(self.output.message()):
            self.feed(delta)
        self.close_block()
        return Response(_encode(self.finish()), media_type="application/json")

    async def events(self, updates: AsyncIterator[Sequence]) -> AsyncIterator[bytes]:
        try:
            yield _event("message_start", message={**self.message, "content": []})
            async for seq in updates:
                text, _ = seq.take_stream_delta()
                for delta in self.output.stream(text):
                    for event in self.feed(delta):
                        yield event
            for event in self.close_block():
                yield event
            message = self.finish()
            yield _event("message_delta", delta={"stop_reason": message["stop_reason"],
                                                 "stop_sequence": message["stop_sequence"]}, usage=message["usage"])
            yield _event("message_stop")
        except ClientDisconnected:
            raise
        except Exception as exc:  # the headers are out: report in-band, in this API's shape
            if not isinstance(exc, APIError):
                log.exception("stream failed")
                exc = APIError(500, f"Internal server error: {type(exc).__name__}")
            self.gen.fail()
            yield _event("error", error=error_body(exc)["error"])

    def feed(self, delta: DeltaMessage) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning_content:
            out += self._text("thinking", delta.reasoning_content)
        if delta.content:
            out += self._text("text", delta.content)
        for part in delta.tool_calls:
            if "id" in part:
                out += self.close_block()
                call_id = part["id"]  # chat's call_ ids as Anthropic's toolu_ (a model's own ids are kept)
                call_id = "toolu_" + call_id.removeprefix("call_") if call_id.startswith("call_") else call_id
                out += self._start({"type": "tool_use", "id": call_id, "name": part["function"]["name"], "input": {}})
            args = part["function"].get("arguments", "")
            if args and self._open is not None:
                self._json += args
                out.append(self._delta({"type": "input_json_delta", "partial_json": args}))
        return out

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        self.message["content"].append(block)
        self._open, self._json = block, ""
        return [_event("content_block_start", index=len(self.message["content"]) - 1, content_block=dict(block))]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", index=len(self.message["content"]) - 1, delta=delta)

    def _text(self, kind: str, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open is None or self._open["type"] != kind:
            out += self.close_block()
            out += self._start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                               else {"type": "text", "text": ""})
        assert self._open is not None
        self._open[kind] += text
        return out + [self._delta({"type": f"{kind}_delta", kind: text})]

    def close_block(self) -> list[bytes]:
        """The event that stops the open block (none open: nothing)."""
        block, self._open = self._open, None
        if block is None:
            return []
        if block["type"] == "tool_use":
            block["input"] = json.loads(self._json or "{}")  # the parsers send only complete, valid calls
        return [_event("content_block_stop", index=len(self.message["content"]) - 1)]

    def finish(self) -> dict[str, Any]:
        """The whole Message, with its stop reason and usage."""
        seq, reason = self.output.seq, self.output.finish_reason
        stop_sequence = seq.stop_reason if isinstance(seq.stop_reason, str) and reason == "stop" else None
        if stop_sequence not in self.stop_sequences:
            stop_sequence = None  # a stop string of the model's own defaults ends the turn
        usage = self.gen.usage()
        self.message["stop_reason"] = {"tool_calls": "tool_use", "length": "max_tokens"}.get(
            reason or "", "stop_sequence" if stop_sequence is not None else "end_turn")
        self.message["stop_sequence"] = stop_sequence
        self.message["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
        return self.message
