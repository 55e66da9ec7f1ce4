"""Tokenizer loading and chat templates, without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model: str):
    """The checkpoint's tokenizer, from a local directory or a hub id (tokenizer files only).
    tokenizer.json loads through PreTrainedTokenizerFast directly, since transformers' Auto
    classes import torch, which the frontend image does not carry."""
    from shared.config import resolve_model_path

    path = str(resolve_model_path(model, weights=False))
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer  # sentencepiece-only checkpoints

    return AutoTokenizer.from_pretrained(path)


def apply_chat_template(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **kwargs: Any,
) -> list[int]:
    """Render a conversation with the model's template and tokenize it (the template carries any BOS)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pass chat_template or use completions")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
    )
    return tokenizer.encode(text, add_special_tokens=False)
