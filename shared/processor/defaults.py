"""The model's generation_config defaults, merged into a request (vLLM's rule: they fill the
fields the user did not set)."""

from __future__ import annotations

from typing import Any

from msgspec.structs import replace

from shared.sampling_params import MODEL_DEFAULTABLE, SamplingParams

DEFAULT_MAX_TOKENS = 16  # completions (and LLM.generate): OpenAI's and vLLM's default
REST_OF_CONTEXT = None  # chat (and LLM.chat): up to the context length unless asked


def merge_model_defaults(params: SamplingParams, model_defaults: dict[str, Any],
                         default_max_tokens: int | None) -> SamplingParams:
    """``params`` with each field the user left unset taken from ``model_defaults`` (keys
    already SamplingParams names); max_tokens unset in both is ``default_max_tokens``."""
    if not params.unset_fields:
        return params
    filled = {f: model_defaults[f] for f in params.unset_fields if f in model_defaults and f in MODEL_DEFAULTABLE}
    if "max_tokens" in params.unset_fields and "max_tokens" not in filled:
        filled["max_tokens"] = default_max_tokens
    return replace(params, **filled, unset_fields=())
