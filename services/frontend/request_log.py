"""vLLM's --enable-log-requests: one log line per request as it arrives."""

from __future__ import annotations

import logging

from shared.sampling_params import SamplingParams

log = logging.getLogger("pagedserve.requests")


def log_request(endpoint: str, prompts: list[list[int]], params: SamplingParams, max_log_len: int | None) -> None:
    """The request's endpoint, sampling parameters and prompt token ids (each cut to
    ``max_log_len`` ids, --max-log-len)."""
    shown = [ids if max_log_len is None else ids[:max_log_len] for ids in prompts]
    log.info("Received request on %s: params: %s, prompt_token_ids: %s", endpoint, params,
             shown[0] if len(shown) == 1 else shown)
