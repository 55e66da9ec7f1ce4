"""Engine logprobs (TokenLogprobs: the sampled token first, then the top-k) in OpenAI's shapes:
completions' {tokens, token_logprobs, top_logprobs, text_offset} and chat's
{content: [{token, logprob, bytes, top_logprobs}]}."""

from __future__ import annotations

import json
import math

from services.frontend.openai_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
)
from shared.protocol import TokenLogprobs

_FLOOR = -9999.0  # JSON has no -inf


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is spelled by one printable character; printable
    latin-1 bytes spell themselves and the rest are shifted past 255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shift)] = byte
            shift += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    return "ByteLevel" in json.dumps(decoder)


class TokenText:
    """Token id -> (text, UTF-8 bytes), cached. The text is the token decoded alone (as the
    offline API reports it); the bytes are the token's own bytes, so a character split across
    tokens can be put back together by the client."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._table = _byte_level_table() if _is_byte_level(tokenizer) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            hit = (text, self._bytes(token_id, text))
            self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int, text: str) -> list[int]:
        if self._table is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in self._table for ch in piece):
                return [self._table[ch] for ch in piece]
        return list(text.encode("utf-8"))


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
