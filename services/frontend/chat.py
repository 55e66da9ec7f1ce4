"""POST /v1/chat/completions: messages rendered with the model's chat template, then generated
like a completion; whole or streamed (the first chunk of each choice carries the role)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.frontend.generation import Generation
from services.frontend.logprobs import chat_logprobs
from services.frontend.openai_requests import ChatCompletionRequest
from services.frontend.openai_responses import (
    SSE_DONE,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    Usage,
    now,
    random_id,
    sse,
)
from services.frontend.sequence import Sequence
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, stream

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
) -> JSONResponse:
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
    usage = Usage.of(gen.num_prompt_tokens, gen.num_completion_tokens)
    resp = ChatCompletionResponse(id=random_id("chatcmpl"), created=now(), model=model, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump(mode="json"))


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
) -> AsyncIterator[str]:
    cid, created = random_id("chatcmpl"), now()
    extra = {"usage": None} if body.include_usage else {}

    def chunk(choice: ChatStreamChoice) -> str:
        return sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice], **extra))

    for seq in gen.ordered():
        role = DeltaMessage(role="assistant", content="")
        yield chunk(ChatStreamChoice(index=seq.index, delta=role, logprobs=None, finish_reason=None))
    async for seq in updates:
        text, new_logprobs = seq.take_stream_delta()
        if not text and not new_logprobs and not seq.finished:
            continue
        delta = DeltaMessage(content=text) if text or not seq.finished else DeltaMessage()
        choice = ChatStreamChoice(
            index=seq.index,
            delta=delta,
            logprobs=_logprobs(state, body, new_logprobs) if new_logprobs else None,
            finish_reason=seq.finish_reason,
        )
        if seq.finished:
            choice.stop_reason = seq.stop_reason
        yield chunk(choice)
    if body.include_usage:
        usage = Usage.of(gen.num_prompt_tokens, gen.num_completion_tokens)
        yield sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=usage))
    yield SSE_DONE
