"""POST /v1/chat/completions: messages rendered with the model's chat template, then generated
like a completion; whole or streamed (the first chunk of each choice carries the role)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from services.frontend.generation import Generation
from services.frontend.logprobs import chat_logprobs
from services.frontend.openai_requests import ChatCompletionRequest
from services.frontend.openai_responses import (
    SSE_DONE,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChunkStream,
    Usage,
    now,
    random_id,
)
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, stream
from shared.processor.sequence import Sequence

ENDPOINT = "/v1/chat/completions"


async def create_chat_completion(state: FrontendState, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    model = state.check_model(body.model)
    state.require_ready()
    state.check_limits(body)
    ids = await state.encode_chat(body.template_messages(), body.add_generation_prompt,
                                  chat_template=body.client_template, template_kwargs=body.chat_template_kwargs)
    state.check_prompt(ids, "messages")
    params = state.sampling_params(body, None, [ids], "messages")  # chat: up to the context length unless asked
    gen = state.generation([ids], params, ENDPOINT, arrival, priority=body.priority)
    if body.stream:
        return await stream(gen, request, lambda updates: _chunks(state, body, gen, model, updates))
    return await respond_whole(gen, request, lambda seqs: _response(state, body, gen, model, seqs))


def _response(
    state: FrontendState, body: ChatCompletionRequest, gen: Generation, model: str, seqs: list[Sequence]
) -> Response:
    choices = [
        ChatChoice(
            index=seq.index,
            message=ChatMessageOut(content=seq.text),
            logprobs=_logprobs(state, body, seq.logprobs),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        for seq in seqs
    ]
    usage = Usage.of(gen.usage())
    resp = ChatCompletionResponse(id=random_id("chatcmpl"), created=now(), model=model, choices=choices, usage=usage)
    return Response(resp.model_dump_json(), media_type="application/json")


def _logprobs(state: FrontendState, body: ChatCompletionRequest, entries: list) -> ChatLogprobs | None:
    if not body.logprobs:
        return None
    assert state.token_text is not None
    return chat_logprobs(entries, state.token_text, body.top_logprobs or 0)


async def _chunks(
    state: FrontendState,
    body: ChatCompletionRequest,
    gen: Generation,
    model: str,
    updates: AsyncIterator[Sequence],
) -> AsyncIterator[bytes]:
    events = ChunkStream(random_id("chatcmpl"), "chat.completion.chunk", model, body.include_usage)
    for seq in gen.ordered():
        role = {"role": "assistant", "content": ""}
        yield events.choice({"index": seq.index, "delta": role, "logprobs": None, "finish_reason": None})
    async for seq in updates:
        text, new_logprobs = seq.take_stream_delta()
        if not text and not new_logprobs and not seq.finished:
            continue
        choice = {
            "index": seq.index,
            "delta": {"content": text} if text or not seq.finished else {},
            "logprobs": _logprobs(state, body, new_logprobs) if new_logprobs else None,
            "finish_reason": seq.finish_reason,
        }
        if seq.finished:
            choice["stop_reason"] = seq.stop_reason
        yield events.choice(choice)
    if body.include_usage:
        yield events.usage(Usage.of(gen.usage()))
    yield SSE_DONE
