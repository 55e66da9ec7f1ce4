"""The text and bytes of single tokens, for logprobs: one source for the offline API and every
endpoint, so a token reads the same wherever it is reported."""

from __future__ import annotations

import json


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
    """Token id -> (text, UTF-8 bytes), cached. The text is the token decoded alone, special
    tokens included; the bytes are the token's own bytes, so a character split across tokens
    can be put back together by the client."""

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

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _bytes(self, token_id: int, text: str) -> list[int]:
        if self._table is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in self._table for ch in piece):
                return [self._table[ch] for ch in piece]
        return list(text.encode("utf-8"))


class TokenIdText(TokenText):
    """vLLM's --return-tokens-as-token-ids: each token reads 'token_id:N' (its bytes that
    string's), so a client can identify tokens that are not valid text on their own."""

    def __init__(self):
        super().__init__(None)

    def get(self, token_id: int) -> tuple[str, list[int]]:
        text = f"token_id:{token_id}"
        return text, list(text.encode())
