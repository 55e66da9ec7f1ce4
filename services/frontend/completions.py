"""POST /v1/completions: prompts (text or token ids, one or many) to text, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from services.frontend.generation import Generation
from services.frontend.logprobs import completion_logprobs, echo_logprobs, prompt_logprobs
from services.frontend.middleware import client_request_id
from services.frontend.openai_requests import CompletionRequest
from services.frontend.openai_responses import (
    SSE_DONE,
    ChunkStream,
    CompletionChoice,
    CompletionResponse,
    Usage,
    now,
    response_id,
)
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole, stream
from shared.processor.sequence import Sequence

ENDPOINT = "/v1/completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def _prompt_ids(state: FrontendState, prompt: str | list, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized (with BOS etc. unless add_special_tokens is
    false), token ids are taken as they are."""
    if isinstance(prompt, str):
        return await state.encode([prompt], add_special_tokens, fit_param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return await state.encode(prompt, add_special_tokens, fit_param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


async def _prompt_texts(state: FrontendState, prompt: str | list, ids: list[list[int]]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [await state.decode(p) for p in ids]


async def create_completion(state: FrontendState, body: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    model = state.check_model(body.model)
    state.check_endpoint(ENDPOINT)
    state.require_ready()
    state.check_limits(body)
    prompts = [state.check_prompt(ids, "prompt", body.truncate_prompt_tokens)
               for ids in await _prompt_ids(state, body.prompt, body.add_special_tokens)]
    params = state.sampling_params(body, DEFAULT_MAX_TOKENS, prompts, "prompt")
    # a truncated prompt echoes the tokens the model saw
    given = body.prompt if body.truncate_prompt_tokens is None else prompts
    echo = await _prompt_texts(state, given, prompts) if body.echo else None
    gen = state.generation(prompts, params, ENDPOINT, arrival, priority=body.priority, model=model)
    answer_id = response_id("cmpl", client_request_id(request.scope) or body.request_id)
    if body.stream:
        return await stream(gen, request, lambda updates: _chunks(state, body, gen, answer_id, model, echo, updates))
    return await respond_whole(gen, request, lambda seqs: _response(state, body, gen, answer_id, model, echo, seqs))


def _response(
    state: FrontendState, body: CompletionRequest, gen: Generation, answer_id: str, model: str,
    echo: list[str] | None, seqs: list[Sequence],
) -> Response:
    choices = [_choice(state, body, gen, seq, echo) for seq in seqs]
    usage = Usage.of(gen.usage())
    resp = CompletionResponse(id=answer_id, created=now(), model=model, choices=choices, usage=usage)
    return Response(resp.model_dump_json(), media_type="application/json")


def _choice(
    state: FrontendState, body: CompletionRequest, gen: Generation, seq: Sequence, echo: list[str] | None
) -> CompletionChoice:
    head = _prompt_part(state, body, gen, seq, echo)
    logprobs = head.logprobs
    if body.logprobs is not None:
        assert state.token_text is not None
        tail, _ = completion_logprobs(seq.logprobs, state.token_text, body.logprobs, len(head.text))
        if logprobs is None:
            logprobs = tail
        else:
            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, field).extend(getattr(tail, field))
    return CompletionChoice(
        index=seq.index,
        text=head.text + seq.text,
        logprobs=logprobs,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        prompt_logprobs=head.prompt_logprobs,
        prompt_token_ids=head.prompt_token_ids,
        token_ids=seq.token_ids if body.return_token_ids else None,
    )


def _prompt_part(
    state: FrontendState, body: CompletionRequest, gen: Generation, seq: Sequence, echo: list[str] | None
) -> CompletionChoice:
    """What a choice says about its prompt: the echoed text, its logprobs (echo with logprobs),
    vLLM's prompt_logprobs and (return_token_ids) its token ids. Prompt logprobs arrive with the
    sequence's first token."""
    texts, scored = state.token_text, seq.prompt_logprobs or []
    text = echo[seq.prompt_index] if echo is not None else ""
    part = CompletionChoice(index=seq.index, text=text, logprobs=None, finish_reason=None)
    if echo is not None and body.logprobs is not None:
        assert texts is not None
        part.logprobs, _ = echo_logprobs(gen.prompts[seq.prompt_index], scored, texts, body.logprobs)
    if body.prompt_logprobs is not None:
        assert texts is not None
        part.prompt_logprobs = prompt_logprobs(scored, texts, body.prompt_logprobs)
    if body.return_token_ids:
        part.prompt_token_ids = gen.prompts[seq.prompt_index]
    return part


async def _chunks(
    state: FrontendState,
    body: CompletionRequest,
    gen: Generation,
    answer_id: str,
    model: str,
    echo: list[str] | None,
    updates: AsyncIterator[Sequence],
) -> AsyncIterator[bytes]:
    events = ChunkStream(answer_id, "text_completion", model, state.include_usage(body))
    # The prompt's chunk: at once, or with the first token when it carries prompt logprobs;
    # without one, the prompt's token ids (return_token_ids) come in the choice's first chunk.
    scored_prompt = body.scores_prompt
    offsets: dict[int, int] = {}
    prompt_sent: set[int] = set()
    if echo is not None and not scored_prompt:
        for seq in gen.ordered():
            prompt_sent.add(seq.index)
            yield events.choice(_prompt_part(state, body, gen, seq, echo))
    async for seq in updates:
        if scored_prompt and seq.index not in offsets and seq.prompt_logprobs is not None:
            head = _prompt_part(state, body, gen, seq, echo)
            offsets[seq.index] = len(head.text)
            prompt_sent.add(seq.index)
            yield events.choice(head)
        text, new_logprobs = seq.take_stream_delta()
        if not text and not new_logprobs and not seq.finished:
            continue
        logprobs = None
        if body.logprobs is not None:
            assert state.token_text is not None
            offset = offsets.get(seq.index, 0)
            logprobs, offsets[seq.index] = completion_logprobs(new_logprobs, state.token_text, body.logprobs, offset)
        choice = {"index": seq.index, "text": text, "logprobs": logprobs, "finish_reason": seq.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = seq.take_stream_token_ids()
            if seq.index not in prompt_sent:
                prompt_sent.add(seq.index)
                choice["prompt_token_ids"] = gen.prompts[seq.prompt_index]
        if seq.finished:
            choice["stop_reason"] = seq.stop_reason
        yield events.choice(choice)
    if state.include_usage(body):
        yield events.usage(Usage.of(gen.usage()))
    yield SSE_DONE
