"""What a request must satisfy before it reaches the engine: its prompts fit the vocabulary and
the context, its max_tokens fits after its longest prompt, its token-id parameters fit the
vocabulary. One wording for every entry point (InvalidRequest: 400 served, ValueError offline)."""

from __future__ import annotations

from shared.processor.errors import InvalidRequest
from shared.sampling_params import SamplingParams

CONTEXT_CODE = "context_length_exceeded"


def context_length_exceeded(max_model_len: int, param: str, tokens: int, *, at_least: bool = False) -> InvalidRequest:
    """A prompt of ``tokens`` tokens (or ``at_least`` that many) that leaves no room for a completion."""
    size = f"at least {tokens}" if at_least else str(tokens)
    msg = (
        f"This model's maximum context length is {max_model_len} tokens. However, your {param} is {size} tokens "
        f"long, which leaves no room for a completion. Please shorten your {param}."
    )
    return InvalidRequest(msg, param, CONTEXT_CODE)


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, param: str) -> None:
    if not ids:
        raise InvalidRequest(f"The {param} must contain at least one token.", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad} is out of range for a vocabulary of {vocab_size}.", param)
    if len(ids) + 1 > max_model_len:
        raise context_length_exceeded(max_model_len, param, len(ids))


def check_max_tokens(params: SamplingParams, prompt_lens: list[int], max_model_len: int, prompt_param: str,
                     max_tokens_param: str) -> None:
    """A max_tokens the user set must fit after the longest prompt (OpenAI's arithmetic); unset,
    the engine stops at the end of the context."""
    max_tokens = params.max_tokens
    longest = max(prompt_lens, default=0)
    if max_tokens is None or "max_tokens" in params.unset_fields or longest + max_tokens <= max_model_len:
        return
    msg = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{longest + max_tokens} tokens ({longest} in the {prompt_param}, {max_tokens} in the completion). "
        f"Please reduce the length of the {prompt_param} or completion."
    )
    raise InvalidRequest(msg, max_tokens_param, CONTEXT_CODE)


def check_token_params(params: SamplingParams, vocab_size: int) -> None:
    """stop_token_ids, logit_bias, allowed_token_ids and bad words name tokens of the vocabulary
    (allowed_token_ids at most once each: no more of them than the vocabulary holds)."""
    allowed = params.allowed_token_ids or []
    if len(allowed) > vocab_size:
        raise InvalidRequest(f"allowed_token_ids: {len(allowed)} token ids given for a vocabulary of {vocab_size}.",
                             "allowed_token_ids")
    bad_words = [t for seq in params.bad_words_token_ids for t in seq]
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {})),
                      ("allowed_token_ids", allowed), ("bad_words", bad_words)):
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{name}: token id {bad} is out of range for a vocabulary of {vocab_size}.", name)
