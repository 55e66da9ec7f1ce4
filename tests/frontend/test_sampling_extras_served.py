"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens extras on /v1/completions and
/v1/chat/completions, through one frontend against the real engine and worker (the tiny llama
checkpoint): only allowed ids are sampled, a bad word's tokens never appear, a truncated prompt
answers as its last k tokens do (usage.prompt_tokens = k), and hostile values are a 400 naming
the field, the service answering after."""

from __future__ import annotations

import httpx
import pytest
from frontend_helpers import GREEDY

pytestmark = pytest.mark.timeout(120)

VOCAB_SIZE, MAX_MODEL_LEN = 1024, 1024  # the tiny llama checkpoint's, e2e_stack.ENGINE_FLAGS
PROMPT = "Hello there, my friend"
MESSAGES = [{"role": "user", "content": PROMPT}]


def test_allowed_token_ids(client, model, model_tokenizer):
    allowed = [model_tokenizer.convert_tokens_to_ids(c) for c in "abc"]  # one character each
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3,
                                    extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert out.usage.completion_tokens == 36
    assert all(len(c.text) == 12 and set(c.text) <= set("abc") for c in out.choices), [c.text for c in out.choices]
    assert len({ch for c in out.choices for ch in c.text}) > 1  # sampled, not one forced token
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                          extra_body={"ignore_eos": True, "allowed_token_ids": allowed[1:2]})
    assert chat.choices[0].message.content == "b" * 8


def test_bad_words(client, model, model_tokenizer):
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    ids = model_tokenizer.encode(PROMPT + plain, add_special_tokens=False)[len(model_tokenizer.encode(
        PROMPT, add_special_tokens=False)):]
    word = next(w for j in range(len(ids) - 1)
                if (w := model_tokenizer.decode(ids[j : j + 2])).strip()
                and model_tokenizer.encode(w.lstrip(), add_special_tokens=False) == ids[j : j + 2])
    assert word.lstrip() in plain
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0,
                                     extra_body={"ignore_eos": True, "bad_words": [word]}).choices[0].text
    cut = plain.index(word.lstrip())
    assert text != plain and text[:cut] == plain[:cut]
    out = model_tokenizer.encode(PROMPT + text, add_special_tokens=False)
    banned = model_tokenizer.encode(word.lstrip(), add_special_tokens=False)
    assert not any(out[i : i + 2] == banned for i in range(len(out) - 1))
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0.0,
                                          extra_body={"ignore_eos": True, "bad_words": ["the", "a"]})
    assert chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize("k", [3, -1])
def test_truncate_prompt_tokens(client, model, model_tokenizer, k):
    ids = model_tokenizer.encode(PROMPT)
    kept = ids[-k:] if k > 0 else ids
    body = {"max_tokens": 8, **GREEDY}
    out = client.completions.create(model=model, prompt=PROMPT, **{**body, "extra_body": {
        **GREEDY["extra_body"], "truncate_prompt_tokens": k}})
    same = client.completions.create(model=model, prompt=kept, **body)
    assert out.choices[0].text == same.choices[0].text and out.usage.prompt_tokens == len(kept)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, extra_body={
        "truncate_prompt_tokens": 2 if k > 0 else -1})
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert chat.usage.prompt_tokens == (2 if k > 0 else full.usage.prompt_tokens)


HOSTILE = [
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-1]),
    ("allowed_token_ids", [VOCAB_SIZE]),
    ("allowed_token_ids", ["1"]),
    ("allowed_token_ids", [1] * 200_000),
    ("allowed_token_ids", [-1] + [1] * 100_000),
    ("allowed_token_ids", 5),
    ("bad_words", [""]),
    ("bad_words", [3]),
    ("bad_words", "word"),
    ("bad_words", ["w"] * 10_000),
    ("bad_words", ["w" * 100_000]),
    ("truncate_prompt_tokens", 0),
    ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", MAX_MODEL_LEN + 1),
    ("truncate_prompt_tokens", 2**70),
    ("truncate_prompt_tokens", "3"),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_values_are_400_naming_the_field(frontend, model, field, value, path):
    body = {"model": model, "max_tokens": 2, field: value}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES})
    resp = httpx.post(f"{frontend}{path}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field, resp.text
    assert len(resp.text) < 1000  # a huge value is not echoed back
    ok = httpx.post(f"{frontend}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
