"""Tokenizer loading, chat templates and the tokenizer's byte bound, without importing torch."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

# apply_chat_template's own parameters that stay template variables when a client sends them in
# chat_template_kwargs; the others (tokenize, padding, return_dict, ...) are the server's to set.
_TEMPLATE_PARAMS = frozenset({"tools", "documents", "continue_final_message"})
# names the renderers set themselves (transformers renders its `conversations` argument as `messages`)
_RENDERER_NAMES = frozenset({"chat_template", "kwargs", "messages", "conversations"})


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, from a local directory or a hub id (tokenizer files only).
    tokenizer.json loads through PreTrainedTokenizerFast directly, since transformers' Auto
    classes import torch, which the frontend image does not carry."""
    from shared.checkpoint import resolve_model_path

    path = str(resolve_model_path(model, weights=False))
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer  # sentencepiece-only checkpoints

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# Whitespace runs, newlines, tabs, accents, CJK and emoji: a tokenizer that gives this back as it
# was given keeps every byte of its input (no normalizer strips or folds text).
_ROUND_TRIP_PROBE = "  a\t\tb \n\n\r\n  Ünïcödé ﬁ 日本語 🙂" + " " * 64 + "\n" * 64 + "end "


def max_token_bytes(tokenizer) -> int | None:
    """An upper bound on the bytes of input text one token covers: the longest vocabulary entry
    in UTF-8. Raw entries are never shorter than the text they stand for (byte-level 'Ġ' is two
    bytes for one, SentencePiece '▁' three for one, '<0x0A>' six for one), so a text of more than
    max_model_len times this many bytes cannot fit the context. None when the tokenizer drops or
    folds input (its round trip changes the probe): then no such bound holds."""
    ids = tokenizer.encode(_ROUND_TRIP_PROBE, add_special_tokens=False)
    if tokenizer.decode(ids, clean_up_tokenization_spaces=False) != _ROUND_TRIP_PROBE:
        return None
    return max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1) or 1


def template_variables(tokenizer, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A client's chat_template_kwargs, less the parameters of apply_chat_template itself, the
    template and the conversation (the caller decides them all)."""
    reserved = set(inspect.signature(type(tokenizer).apply_chat_template).parameters) - _TEMPLATE_PARAMS
    return {k: v for k, v in (kwargs or {}).items() if k not in reserved and k not in _RENDERER_NAMES}


def render_chat(tokenizer, messages: list[dict[str, Any]], /, *, add_generation_prompt: bool = True,
                chat_template: str | None = None, **kwargs: Any) -> str:
    """A conversation rendered with the model's template (or ``chat_template``), as text.
    Raises ValueError when there is no template or the template cannot render these messages (a
    message of the wrong shape, or the template's own raise_exception)."""
    from jinja2 import TemplateError

    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pass chat_template or use completions")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
        )
    except (TypeError, KeyError, AttributeError, IndexError, TemplateError) as exc:
        raise ValueError(f"The chat template could not render these messages: {exc}") from None


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """Render a conversation with the model's template and tokenize it (the template carries any BOS)."""
    return tokenizer.encode(render_chat(tokenizer, messages, **kwargs), add_special_tokens=False)
