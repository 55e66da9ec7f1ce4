"""Pooling requests outside the model, shared by the offline LLM and the frontend: inputs to token
ids (truncated only when truncate_prompt_tokens asks), (query, document) pairs for a
cross-encoder, checks against the vocabulary and the context, and cosine scores for an embedding
model. Raises InvalidRequest (400 served, ValueError offline)."""

from __future__ import annotations

import math
import numbers

from shared.processor.errors import InvalidRequest
from shared.sampling_params import SamplingParams

# what a pooling request carries for SamplingParams: unused (it samples nothing), the engine needs one
POOLING_SAMPLING = SamplingParams(max_tokens=1)

# Characters a text may have per token of the context (or of truncate_prompt_tokens). Tokenizing
# costs time in proportion to the text, and an embedding tokenizer (WordPiece) folds its input --
# it drops whitespace and spells an over-long word as one [UNK] -- so no exact bound on the tokens
# of a text exists before tokenizing it. Real text runs at about 4 characters a token: a text over
# this cap is refused, or, when truncation is asked for, cut to the cap before tokenizing.
MAX_CHARS_PER_TOKEN = 64


def resolve_truncation(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The number of tokens to keep (-1: max_model_len), or None to refuse longer inputs."""
    if truncate_prompt_tokens is None:
        return None
    if isinstance(truncate_prompt_tokens, bool) or not isinstance(truncate_prompt_tokens, numbers.Integral):
        raise InvalidRequest(f"truncate_prompt_tokens must be an integer, got {truncate_prompt_tokens!r}",
                             "truncate_prompt_tokens")
    truncate_prompt_tokens = int(truncate_prompt_tokens)
    if truncate_prompt_tokens == -1:
        return max_model_len
    if not 1 <= truncate_prompt_tokens <= max_model_len:
        raise InvalidRequest(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}], "
                             f"got {truncate_prompt_tokens}", "truncate_prompt_tokens")
    return truncate_prompt_tokens


class PoolingInputs:
    """Token ids of pooling inputs for one model (its tokenizer, vocabulary and context)."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len

    def encode(self, prompt: str | list[int], truncate: int | None, param: str = "input") -> list[int]:
        """A text (tokenized with the model's special tokens) or token ids; truncate keeps the
        first tokens of a text (the tokenizer's side) or the last ones of token ids (as vLLM)."""
        if isinstance(prompt, str):
            prompt = self.cap_text(prompt, truncate, param)
            kwargs = {"truncation": True, "max_length": truncate} if truncate else {}
            ids = self.tokenizer(prompt, add_special_tokens=True, **kwargs)["input_ids"]
        else:
            ids = list(prompt)[-truncate:] if truncate else list(prompt)
        self.check(ids, param)
        return ids

    def encode_pair(self, query: str, document: str, truncate: int | None, param: str = "documents") -> tuple[list[int], int]:
        """A cross-encoder's input: (token ids, first token of the document's segment)."""
        query, document = self.cap_text(query, truncate, param), self.cap_text(document, truncate, param)
        kwargs = {"truncation": True, "max_length": truncate} if truncate else {}
        enc = self.tokenizer(query, document, add_special_tokens=True, **kwargs)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        self.check(ids, param)
        return ids, next((i for i, t in enumerate(types or ()) if t), 0)

    def cap_text(self, text: str, truncate: int | None, param: str) -> str:
        """The text, cut to MAX_CHARS_PER_TOKEN characters a token when truncation is asked for;
        InvalidRequest, before any tokenizing, for a longer one when it is not."""
        limit = (truncate or self.max_model_len) * MAX_CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        if truncate:
            return text[:limit]
        raise InvalidRequest(
            f"This model's maximum context length is {self.max_model_len} tokens, and a text of more than {limit} "
            f"characters cannot fit it; your {param} is {len(text)} characters long. Shorten it, or set "
            "truncate_prompt_tokens.", param, "context_length_exceeded")

    def check(self, ids: list[int], param: str) -> None:
        if not ids:
            raise InvalidRequest(f"The {param} must contain at least one token.", param)
        bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is out of range for a vocabulary of {self.vocab_size}.", param)
        if len(ids) > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {param} is "
                f"{len(ids)} tokens long. Shorten it, or set truncate_prompt_tokens.", param, "context_length_exceeded")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def check_cross_encoder(labels: list[str]) -> None:
    """A classifier scores (query, document) pairs only as a cross-encoder: one label, whose
    probability is the score. One with more labels gives class probabilities, not a score."""
    if len(labels) != 1:
        raise InvalidRequest(f"This model is a sequence classifier with {len(labels)} labels: it classifies "
                             "(classify), and cannot score pairs; score and rerank need a cross-encoder (one label) "
                             "or an embedding model.", code="unsupported_endpoint")


def pair_up(queries: list, documents: list) -> list[tuple]:
    """vLLM's pairing for score: one query against every document, or the i-th with the i-th."""
    if not queries or not documents:
        raise InvalidRequest("score needs at least one query and one document.", "text_1")
    if len(queries) == 1:
        return [(queries[0], d) for d in documents]
    if len(queries) != len(documents):
        raise InvalidRequest(f"got {len(queries)} queries for {len(documents)} documents: give one query, or one "
                             "per document.", "text_2")
    return list(zip(queries, documents))
