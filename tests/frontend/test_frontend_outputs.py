"""What a completion reports besides its text, against the real engine and worker (the tiny
llama checkpoint): logprobs in both APIs, prompt logprobs and echo, and structured outputs
(response_format, vLLM's structured_outputs and guided_* extras, and their errors)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from frontend_helpers import GREEDY

pytestmark = pytest.mark.timeout(120)


def test_logprobs_shapes(client, model):
    out = client.completions.create(model=model, prompt="Hello", max_tokens=4, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    # Greedy: each chosen token is the most likely one.
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and chosen == pytest.approx(max(top.values()), abs=1e-5)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace") == chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, stream=True,
        **GREEDY,
    )
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 3


def test_echo_with_logprobs_and_prompt_logprobs(client, model, model_tokenizer, greedy):
    ids = model_tokenizer.encode("Hello there, how are", add_special_tokens=False)
    out = client.completions.create(model=model, prompt=ids, max_tokens=3, echo=True, logprobs=2,
                                    extra_body={"prompt_logprobs": 1, "ignore_eos": True}, temperature=0.0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text == model_tokenizer.decode(ids) + greedy(model_tokenizer.decode(ids), 3)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids)] == len(model_tokenizer.decode(ids))
    scored = choice.model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for i in range(1, len(ids)):  # the echoed logprobs and vLLM's prompt_logprobs agree
        entry = scored[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(lp.token_logprobs[i], abs=1e-6) and entry["rank"] >= 1
        assert entry["decoded_token"] == lp.tokens[i]
        assert len(lp.top_logprobs[i]) >= 2 and all(v <= 0 for v in lp.top_logprobs[i].values())
    # completion tokens after the prompt: greedy, so each is the most likely one
    for chosen, top in zip(lp.token_logprobs[len(ids):], lp.top_logprobs[len(ids):]):
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    # streamed: the prompt's chunk (with its logprobs) comes with the first token, then the rest
    chunks = list(client.completions.create(model=model, prompt=ids, max_tokens=3, echo=True, logprobs=2, stream=True,
                                            extra_body={"prompt_logprobs": 1, "ignore_eos": True}, temperature=0.0))
    first = chunks[0].choices[0]
    assert first.text == model_tokenizer.decode(ids)
    for got, want in zip(first.model_extra["prompt_logprobs"][1:], scored[1:]):
        assert got.keys() == want.keys()
        assert all(got[t]["logprob"] == pytest.approx(want[t]["logprob"], abs=1e-5) for t in got)
    streamed = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(ch.text for chunk in chunks for ch in chunk.choices) == choice.text
    assert [t for c in streamed for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.logprobs.text_offset] == lp.text_offset


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}


def test_structured_outputs(frontend, client, model):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    for temperature in (0.0, 1.0):
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Answer"}],
                                              max_tokens=40, temperature=temperature, seed=7, response_format=fmt)
        jsonschema.validate(json.loads(chat.choices[0].message.content), ANSWER_SCHEMA)
        assert chat.choices[0].finish_reason == "stop"
    out = client.completions.create(model=model, prompt="Pick", max_tokens=10, temperature=1.0, seed=3,
                                    extra_body={"guided_choice": ["red", "green", "blue sky"]})
    assert out.choices[0].text in ("red", "green", "blue sky")
    out = client.completions.create(model=model, prompt="Code", max_tokens=10, temperature=1.0, seed=3,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", out.choices[0].text)
    obj = client.completions.create(model=model, prompt="{", max_tokens=8, temperature=0.0,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert obj.choices[0].text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"guided_json": {"type": "bogus"}}, None, 'Unsupported type "bogus"'),  # refused by the worker
        ({"guided_regex": "(", "guided_choice": ["a"]}, "structured_outputs", "only output constraint"),
        ({"guided_regex": "("}, "structured_outputs", "regex is invalid"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"xml": "a"}}, "structured_outputs", "unknown field"),
    ],
)
def test_bad_structured_outputs_are_400s(frontend, model, extra, param, words):
    body = {"model": model, "prompt": "x", "max_tokens": 4, **extra}
    resp = httpx.post(f"{frontend}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    ok = httpx.post(f"{frontend}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200  # the engine and worker carry on


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/score", "/v1/rerank"])
def test_pooling_requests_to_a_generating_model_are_400s(frontend, model, path):
    body = {"input": "x", "text_1": "a", "text_2": "b", "query": "a", "documents": ["b"]}
    resp = httpx.post(f"{frontend}{path}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert "/v1/completions" in resp.json()["error"]["message"]
