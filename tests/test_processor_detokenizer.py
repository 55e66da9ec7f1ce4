"""Incremental detokenization: split UTF-8 characters and stop strings, token by token."""

from __future__ import annotations

import pytest

from shared.processor.detokenizer import IncrementalDetokenizer
from shared.processor.tokenizer import load_tokenizer
from shared.sampling_params import SamplingParams

TEXT = "Grüße aus Köln 😀 日本語のテキスト, and plain words too."


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return load_tokenizer(str(model_dirs("llama")))


def stream(tokenizer, ids, params, prompt=()):
    detok = IncrementalDetokenizer(tokenizer, list(prompt), params)
    deltas = []
    for i, token in enumerate(ids):
        stop = detok.add([token])
        deltas.append(detok.take_stream_delta(finished=stop is not None or i == len(ids) - 1))
        if stop is not None:
            break
    return detok, deltas


def test_split_multibyte_characters_are_never_streamed_broken(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # byte-level BPE over a small vocabulary: some characters must span several tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    detok, deltas = stream(tokenizer, ids, SamplingParams())
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_text_and_partial_stop_is_held_back(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, SamplingParams(stop=["Köln"]))
    assert detok.stop_str == "Köln"
    assert detok.text == "Grüße aus "
    assert "".join(deltas) == "Grüße aus "
    assert not any("K" in d for d in deltas)  # the start of the stop string was never sent
    kept, _ = stream(tokenizer, ids, SamplingParams(stop=["Köln"], include_stop_str_in_output=True))
    assert kept.text == "Grüße aus Köln"


def test_unmatched_stop_string_releases_held_text_at_the_end(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, SamplingParams(stop=["never appears"]))
    assert detok.stop_str is None
    assert "".join(deltas) == TEXT


def test_leading_space_uses_prompt_context(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    ids = tokenizer.encode("Hello world", add_special_tokens=False)[len(prompt):]
    detok, _ = stream(tokenizer, ids, SamplingParams(), prompt=prompt)
    assert detok.text == " world"
