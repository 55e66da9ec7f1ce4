"""Engine logprobs (TokenLogprobs: the sampled token first, then the top-k) in OpenAI's shapes:
completions' {tokens, token_logprobs, top_logprobs, text_offset} and chat's
{content: [{token, logprob, bytes, top_logprobs}]}."""

from __future__ import annotations

import math

from services.frontend.openai_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
)
from shared.processor.token_text import TokenText
from shared.protocol import TokenLogprobs

_FLOOR = -9999.0  # JSON has no -inf


def _clean(value: float) -> float:
    return value if not math.isnan(value) and value > _FLOOR else _FLOOR


def completion_logprobs(
    entries: list[TokenLogprobs], texts: TokenText, num_top: int, text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """Completions logprobs for these positions, text offsets counted from ``text_offset``;
    returns them with the offset after the last token."""
    # every field set explicitly: streamed chunks are dumped with exclude_unset
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in entries:
        token, _ = texts.get(lp.token_ids[0])
        out.tokens.append(token)
        out.token_logprobs.append(_clean(lp.logprobs[0]))
        top = {texts.get(t)[0]: _clean(v) for t, v in zip(lp.token_ids[1 : 1 + num_top], lp.logprobs[1 : 1 + num_top])}
        top.setdefault(token, _clean(lp.logprobs[0]))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out, text_offset


def echo_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprobs], texts: TokenText, num_top: int
) -> tuple[CompletionLogprobs, int]:
    """Completions logprobs of an echoed prompt: the first token has none (null, as OpenAI
    reports it), the others come from the engine's prompt logprobs. Returns them with the text
    offset after the prompt."""
    first, _ = texts.get(prompt_ids[0])
    rest, offset = completion_logprobs(entries, texts, num_top, len(first))
    out = CompletionLogprobs(
        tokens=[first, *rest.tokens],
        token_logprobs=[None, *rest.token_logprobs],
        top_logprobs=[None, *rest.top_logprobs],
        text_offset=[0, *rest.text_offset],
    )
    return out, offset


def prompt_logprobs(entries: list[TokenLogprobs], texts: TokenText, num_top: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then {token id: logprob, rank,
    decoded token} with the prompt's token first and the top num_top after it."""
    out: list[dict | None] = [None]
    for lp in entries:
        entry = {str(lp.token_ids[0]): PromptLogprob(logprob=_clean(lp.logprobs[0]), rank=lp.rank,
                                                    decoded_token=texts.get(lp.token_ids[0])[0])}
        for rank, (tid, value) in enumerate(zip(lp.token_ids[1 : 1 + num_top], lp.logprobs[1 : 1 + num_top]), 1):
            entry.setdefault(str(tid), PromptLogprob(logprob=_clean(value), rank=rank, decoded_token=texts.get(tid)[0]))
        out.append(entry)
    return out


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenText, num_top: int) -> ChatLogprobs:
    content = []
    for lp in entries:
        token, raw = texts.get(lp.token_ids[0])
        top = []
        for tid, value in zip(lp.token_ids[1 : 1 + num_top], lp.logprobs[1 : 1 + num_top]):
            text, tb = texts.get(tid)
            top.append(ChatTopLogprob(token=text, logprob=_clean(value), bytes=tb))
        content.append(ChatTokenLogprob(token=token, logprob=_clean(lp.logprobs[0]), bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)
