"""What one request may ask of a frontend: body size, n, logprobs, prompts per request, client
chat templates; and the bound on a text's length before it is tokenized (the processor, in
shared.processor.checks, words every context error)."""

from __future__ import annotations

from typing import Any

from services.frontend.errors import bad_request, from_value_error
from shared.frontend_args import RequestLimits
from shared.processor.checks import context_length_exceeded

# Entries of the list-like fields, each of which something walks on every token (the stop-string
# search, the engine's stop-token test, the sampler's bias).
MAX_ENTRIES = {"stop": 128, "stop_token_ids": 1024, "logit_bias": 1024}


def check_caps(body: Any, limits: RequestLimits) -> None:
    """400 when the request asks for more samples, logprobs, stops, biases or prompts than this
    server allows."""
    if (body.n or 1) > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n} on this server, got {body.n}.", "n")
    for field, value in body.logprob_requests().items():
        if value > limits.max_logprobs:
            raise bad_request(f"{field} must be at most {limits.max_logprobs} on this server, got {value}.", field)
    for field, cap in MAX_ENTRIES.items():
        value = getattr(body, field)
        count = 1 if isinstance(value, str) else len(value or ())
        if count > cap:
            raise bad_request(f"{field} may hold at most {cap} entries on this server, got {count}.", field)
    prompts = getattr(body, "num_prompts", 1)
    if prompts > limits.max_prompts_per_request:
        msg = f"A request may hold at most {limits.max_prompts_per_request} prompts on this server, got {prompts}."
        raise bad_request(msg, "prompt")


def check_text_fits(text: str, max_model_len: int, max_token_bytes: int, param: str) -> None:
    """Reject, before tokenizing it, a text too long to fit: no token covers more than
    ``max_token_bytes`` bytes, so it has at least len(bytes) / max_token_bytes tokens."""
    if len(text) <= (max_model_len - 1) * max_token_bytes // 4:
        return  # UTF-8 takes at most 4 bytes a character: no need to count
    size = len(text.encode("utf-8"))
    min_tokens = -(-size // max_token_bytes)
    if min_tokens + 1 > max_model_len:
        raise from_value_error(context_length_exceeded(max_model_len, param, min_tokens, at_least=True), set())
