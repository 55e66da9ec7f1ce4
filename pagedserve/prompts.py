"""The prompts the offline API takes, vLLM's: a text, or a dict with 'prompt' (a text) or
'prompt_token_ids' (a list of token ids); one, or a list of them. And the arguments given for
all prompts at once or prompt by prompt (sampling_params, lora_request, priority). Anything else
is a ValueError."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from shared.sampling_params import is_int

PromptType = str | dict[str, Any]

_SHAPE = "a prompt must be a str or a dict with 'prompt' or 'prompt_token_ids'"


def prompt_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    """One prompt as a list of one; a list or tuple of prompts as a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be a prompt or a list of prompts ({_SHAPE}), got {prompts!r}")


def prompt_of(prompt: PromptType) -> str | list[int]:
    """A prompt's text, or its token ids (their range is the processor's to check)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(map(is_int, ids)):
            raise ValueError(f"prompt_token_ids must be a list of token ids, got {ids!r}")
        return list(ids)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise ValueError(f"{_SHAPE}, got {prompt!r}")


def texts_of(data: str | Seq[str], name: str) -> list[str]:
    """score()'s queries or documents: one text, or a list of texts."""
    texts = [data] if isinstance(data, str) else list(data) if isinstance(data, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a str or a list of str, got {data!r}")
    return texts


def per_prompt(value: Any, kind: type, name: str, count: int) -> list[Any]:
    """An argument given for every prompt at once (one `kind`, or None) or prompt by prompt (a
    list or tuple of `kind` or None, one per prompt), as one entry per prompt."""
    given = [value] * count if value is None or isinstance(value, kind) else \
        list(value) if isinstance(value, (list, tuple)) else [value]
    wrong = next((v for v in given if v is not None and not isinstance(v, kind)), None)
    if wrong is not None:
        raise ValueError(f"{name} must be a {kind.__name__}, a list of them (one per prompt) or None, got {wrong!r}")
    if len(given) != count:
        raise ValueError(f"got {len(given)} {name} for {count} prompts")
    return given
