"""The Responses API: POST /v1/responses (whole, streamed as typed events, or in the background),
GET and DELETE /v1/responses/{id}, its input_items, and cancel. A response runs as the chat
completion its input makes (responses_requests), through the same ChatPlan parsers; its output
items (reasoning, message, function calls) are built by one writer, which also makes the
stream's events in order."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from services.frontend.errors import APIError, bad_request, validation_error
from services.frontend.generation import Generation
from services.frontend.response_background import UNFINISHED, BackgroundResponses
from services.frontend.response_events import EventWriter, deltas_of
from services.frontend.response_store import ResponseStore
from services.frontend.responses_requests import ResponsesRequest
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, sse, stream
from shared.processor.chat import ChatOutput
from shared.processor.sequence import Sequence

ENDPOINT = "/v1/responses"
_FUNCTION_PATH = re.compile(r"(tools\[\d+\])\.function\b")


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


async def create_response(state: FrontendState, store: ResponseStore, background: BackgroundResponses,
                          body: ResponsesRequest, request: Request) -> Response:
    arrival = time.monotonic()
    model = state.check_model(body.model)
    state.check_endpoint(ENDPOINT)
    state.require_ready()
    if body.background and not body.store:
        raise bad_request("Invalid value for 'background': a background response must be stored (store: true).",
                          "background")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        status = previous.response["status"]
        if status in UNFINISHED:
            raise bad_request(f"Response '{body.previous_response_id}' is still {status}; continue it once it is done.",
                              "previous_response_id", code="response_not_ready")
        history = list(previous.messages)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = system + history + body.input_messages()
    try:
        chat = body.chat_request(messages)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    state.check_limits(chat)
    try:
        plan = state.chat_plan(messages, chat.tools, chat.tool_choice, chat.parallel_tool_calls)
    except APIError as exc:  # named in chat's shape: tools[i].function.x is tools[i].x here
        exc.param = _FUNCTION_PATH.sub(r"\1", exc.param) if exc.param else exc.param
        exc.message = _FUNCTION_PATH.sub(r"\1", exc.message)
        raise
    ids = await state.encode_chat(messages, True, chat_template=chat.client_template,
                                  template_kwargs=plan.template_variables(chat.template_kwargs()))
    state.check_prompt(ids, "input")
    params = state.sampling_params(chat, None, [ids], "input", plan)
    gen = state.generation([ids], params, ENDPOINT, arrival, model=model)
    output = plan.output(gen.ordered()[0], state.tokenizer)
    run = ResponseRun(state, store, body, model, gen, output, history + body.input_messages())
    if body.background:
        queued = background.start(run)
        if body.stream:
            return sse(background.stream(queued["id"]))
        return Response(msgspec.json.encode(queued), media_type="application/json")
    if body.stream:
        return await stream(gen, request, run.events)
    return await respond_whole(gen, request, run.whole)


class ResponseRun:
    """One response being made: its writer, and what it stores."""

    def __init__(self, state: FrontendState, store: ResponseStore, body: ResponsesRequest, model: str,
                 gen: Generation, output: ChatOutput, messages: list[dict[str, Any]]):
        self.state, self.store, self.body, self.gen, self.output = state, store, body, gen, output
        self.messages = messages  # the conversation this response continues (without instructions)
        self.input_items = body.input_items()
        self.writer = EventWriter(_envelope(body, model))

    def whole(self, seqs: list[Sequence]) -> Response:
        for delta in deltas_of(self.output.message()):
            self.writer.feed(delta)
        self.writer.close_item()
        return Response(msgspec.json.encode(self.finish()), media_type="application/json")

    async def events(self, updates: AsyncIterator[Sequence]) -> AsyncIterator[bytes]:
        yield self.writer.event("response.created", response=self.writer.snapshot("in_progress"))
        yield self.writer.event("response.in_progress", response=self.writer.snapshot("in_progress"))
        async for seq in updates:
            text, _ = seq.take_stream_delta()
            for delta in self.output.stream(text):
                for event in self.writer.feed(delta):
                    yield event
        for event in self.writer.close_item():
            yield event
        # response.completed even when incomplete (its status says so): the SDK's stream helper
        # needs it to build the final response, as vLLM sends it
        yield self.writer.event("response.completed", response=self.finish())

    def finish(self, status: str | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
        """The final Response object, stored when asked: ``status`` (cancelled, failed with
        ``error``) or, by default, completed or incomplete as the generation ended."""
        seq = self.gen.ordered()[0]
        usage = self.gen.usage()
        reasoning = self.output.reasoning_tokens() if self.state.chat_parsers.reasoning_parser else 0
        if status is None:
            status = "incomplete" if seq.finish_reason == "length" else "completed"
        response = self.writer.snapshot(status)
        response["error"] = error
        if seq.finish_reason == "length":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response["usage"] = {
            "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": seq.num_cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage.total_tokens,
        }
        self.save(response)
        return response

    def save(self, response: dict[str, Any]) -> None:
        """Store the response (when asked) with the conversation it ends."""
        if self.body.store:
            self.store.put(response["id"], response, self.messages + [self.writer.assistant_message()],
                           self.input_items)


def _envelope(body: ResponsesRequest, model: str) -> dict[str, Any]:
    """The Response object's fields that do not depend on the output."""
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response", "created_at": int(time.time()), "model": model, "error": None,
        "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "temperature": body.temperature, "top_p": body.top_p,
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "text": body.text or {"format": {"type": "text"}}, "store": body.store, "usage": None,
        "background": body.background,
        "reasoning": body.reasoning.model_dump() if body.reasoning else {"effort": None, "summary": None},
    }


def item_page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """One page of a response's input items (OpenAI's list object): ``limit`` items in ``order``
    (asc: as given), starting after the item ``after`` names."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise bad_request(f"No input item with id '{after}' in this response.", "after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
