"""POST /v1/chat/completions: messages rendered with the model's chat template, then generated
like a completion; whole or streamed (the first chunk of each choice carries the role, and the
prompt's token ids with return_token_ids; with echo, the echoed text comes next)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from fastapi import Request
from fastapi.responses import Response

from services.frontend.generation import Generation
from services.frontend.logprobs import chat_logprobs
from services.frontend.middleware import client_request_id
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
    response_id,
)
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, stream
from shared.processor.chat import ChatOutput
from shared.processor.sequence import Sequence

ENDPOINT = "/v1/chat/completions"


async def create_chat_completion(state: FrontendState, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    model = state.check_model(body.model)
    state.check_endpoint(ENDPOINT)
    state.require_ready()
    state.check_limits(body)
    messages = body.template_messages()
    plan = state.chat_plan(messages, body.tools, body.tool_choice, body.parallel_tool_calls)
    ids = await state.encode_chat(messages, body.add_generation_prompt, chat_template=body.client_template,
                                  template_kwargs=plan.template_variables(body.template_kwargs(),
                                                                          body.continue_final_message),
                                  add_special_tokens=body.add_special_tokens)
    ids = state.check_prompt(ids, "messages", body.truncate_prompt_tokens)
    params = state.sampling_params(body, None, [ids], "messages", plan)  # chat: up to the context length unless asked
    gen = state.generation([ids], params, ENDPOINT, arrival, priority=body.priority, model=model)
    outputs = {seq.index: plan.output(seq, state.tokenizer) for seq in gen.ordered()}
    reasoning = state.chat_parsers.reasoning_parser is not None
    reply = _Reply(response_id("chatcmpl", client_request_id(request.scope) or body.request_id), model,
                   body.reply_role(state.config.response_role), body.echoed(state.config.response_role))
    if body.stream:
        return await stream(gen, request, lambda updates: _chunks(state, body, gen, reply, outputs, updates))
    return await respond_whole(gen, request, lambda seqs: _response(state, body, gen, reply, outputs, reasoning))


class _Reply(NamedTuple):
    """What the answer says of itself, whole or streamed: its id, the model, its role and the
    text it starts with (echo)."""

    id: str
    model: str
    role: str
    echo: str


def _usage(gen: Generation, outputs: dict[int, ChatOutput], reasoning: bool) -> Usage:
    """The request's usage; with a reasoning parser, its reasoning tokens too."""
    return Usage.of(gen.usage(), sum(o.reasoning_tokens() for o in outputs.values()) if reasoning else None)


def _response(state: FrontendState, body: ChatCompletionRequest, gen: Generation, reply: _Reply,
              outputs: dict[int, ChatOutput], reasoning: bool) -> Response:
    choices = []
    ids = bool(body.return_token_ids)
    for seq in gen.ordered():
        output = outputs[seq.index]
        message = ChatMessageOut.of(output.message())  # parses; then finish_reason knows of calls
        message.role = reply.role
        if reply.echo:
            message.content = reply.echo + (message.content or "")
        choices.append(ChatChoice(index=seq.index, message=message, logprobs=_logprobs(state, body, seq.logprobs),
                                  finish_reason=output.finish_reason, stop_reason=seq.stop_reason,
                                  token_ids=seq.token_ids if ids else None))
    usage = _usage(gen, outputs, reasoning)
    resp = ChatCompletionResponse(id=reply.id, created=now(), model=reply.model, choices=choices, usage=usage,
                                  prompt_token_ids=gen.prompts[0] if ids else None)
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
    reply: _Reply,
    outputs: dict[int, ChatOutput],
    updates: AsyncIterator[Sequence],
) -> AsyncIterator[bytes]:
    events = ChunkStream(reply.id, "chat.completion.chunk", reply.model, state.include_usage(body))
    prompt = {"prompt_token_ids": gen.prompts[0]} if body.return_token_ids else None
    for seq in gen.ordered():
        role = {"role": reply.role, "content": ""}
        yield events.choice({"index": seq.index, "delta": role, "logprobs": None, "finish_reason": None}, prompt)
    for seq in gen.ordered() if reply.echo else ():
        yield events.choice({"index": seq.index, "delta": {"content": reply.echo}, "logprobs": None,
                             "finish_reason": None})
    async for seq in updates:
        text, new_logprobs = seq.take_stream_delta()
        output = outputs[seq.index]
        deltas = [d.to_openai() for d in output.stream(text)]
        if not deltas and not new_logprobs and not seq.finished:
            continue
        # held-back text (a possible stop string or call) still sends the tokens' logprobs
        deltas = deltas or [{} if seq.finished else {"content": ""}]
        new_ids = seq.take_stream_token_ids()
        for i, delta in enumerate(deltas):
            last = seq.finished and i == len(deltas) - 1
            choice = {
                "index": seq.index,
                "delta": delta,
                "logprobs": _logprobs(state, body, new_logprobs) if new_logprobs and i == 0 else None,
                "finish_reason": output.finish_reason if last else None,
            }
            if body.return_token_ids:
                choice["token_ids"] = new_ids if i == 0 else []
            if last:
                choice["stop_reason"] = seq.stop_reason
            yield events.choice(choice)
    if state.include_usage(body):
        yield events.usage(_usage(gen, outputs, state.chat_parsers.reasoning_parser is not None))
    yield SSE_DONE
