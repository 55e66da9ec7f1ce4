"""The lean streaming path: SSE chunks built from pre-serialized envelopes, and detokenization
straight through the Rust tokenizer. What a client sees must not change: the raw event stream is
checked byte by byte for OpenAI's shape, and its text against the same request unstreamed."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from shared.processor.detokenizer import IncrementalDetokenizer, decoder_of
from shared.sampling_params import SamplingParams

PROMPT = [5, 17, 42, 99, 7, 250, 3]
BODY = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 9}


def _events(resp: httpx.Response) -> list[str]:
    """The stream's events, checking the SSE framing of each: one `data: ...` line, a blank line."""
    raw = resp.read().decode("utf-8")
    assert raw.endswith("data: [DONE]\n\n")
    parts = raw.split("\n\n")
    assert parts[-1] == "" and all(p.startswith("data: ") and "\n" not in p for p in parts[:-1])
    return [p[len("data: "):] for p in parts[:-1]]


def _stream(base: str, path: str, body: dict) -> list[dict]:
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/v1/{path}", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _check_envelopes(chunks: list[dict], obj: str, model: str, with_usage: bool) -> None:
    keys = ["id", "object", "created", "model", "choices"] + (["usage"] if with_usage else [])
    assert all(list(c) == keys for c in chunks)  # OpenAI's field order, nothing more
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == obj and c["model"] == model for c in chunks)


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream_bytes(frontend: str, model: str, include_usage: bool) -> None:
    body = {"model": model, "prompt": PROMPT, **BODY}
    whole = httpx.post(f"{frontend}/v1/completions", json=body, timeout=60).json()
    stream = {"stream": True, "stream_options": {"include_usage": include_usage}}
    chunks = _stream(frontend, "completions", {**body, **stream})
    _check_envelopes(chunks, "text_completion", model, include_usage)
    choices = [c for c in chunks if c["choices"]]
    assert all(list(c["choices"][0])[:4] == ["index", "text", "logprobs", "finish_reason"] for c in choices)
    assert "".join(c["choices"][0]["text"] for c in choices) == whole["choices"][0]["text"]
    last = choices[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("length", None)
    assert all("stop_reason" not in c["choices"][0] for c in choices[:-1])
    if include_usage:
        assert all(c["usage"] is None for c in choices)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        assert whole["usage"]["completion_tokens"] == BODY["max_tokens"]
    else:
        assert len(chunks) == len(choices)


def test_chat_stream_bytes(frontend: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Café 日本語 🙂"}], **BODY}
    whole = httpx.post(f"{frontend}/v1/chat/completions", json=body, timeout=60).json()
    stream = {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    chunks = _stream(frontend, "chat/completions", {**body, **stream})
    _check_envelopes(chunks, "chat.completion.chunk", model, True)
    first, rest = chunks[0]["choices"][0], [c["choices"][0] for c in chunks[1:] if c["choices"]]
    assert first == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
    assert "".join(c["delta"].get("content", "") for c in rest) == whole["choices"][0]["message"]["content"]
    entries = [e for c in rest if c["logprobs"] for e in c["logprobs"]["content"]]
    assert len(entries) == BODY["max_tokens"] and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(isinstance(e["logprob"], float) and e["logprob"] <= 0 for e in entries)
    assert rest[-1]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]


def test_fast_decoder_matches_tokenizer(tokenizer) -> None:
    decode = decoder_of(tokenizer)
    assert decode is not tokenizer.decode  # the Rust path is taken for this tokenizer
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        for skip in (True, False):
            assert decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_decoder_keeps_transformers_cleanup(tokenizer_dir) -> None:
    from transformers import PreTrainedTokenizerFast

    cleaning = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir, clean_up_tokenization_spaces=True)
    assert decoder_of(cleaning) == cleaning.decode


def test_incremental_text_matches_whole_decode(tokenizer) -> None:
    """Token by token, the text is what decoding the whole output at once gives, multi-byte
    characters split across tokens included."""
    rng = random.Random(1)
    ids = tokenizer.encode("Café, naïve, 日本語, emoji 🙂 and more text 🙂🙂 at the end", add_special_tokens=False)
    for _ in range(20):
        out = ids[rng.randrange(len(ids)) :] + [rng.randrange(len(tokenizer)) for _ in range(30)]
        detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(max_tokens=64))
        for token in out:
            detok.add([token])
        expected = tokenizer.decode(out, skip_special_tokens=True)
        # held back at the end: only an incomplete UTF-8 sequence
        assert expected.startswith(detok.text) and set(expected[len(detok.text) :]) <= {"\ufffd"}
