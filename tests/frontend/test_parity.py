"""One request, two ways: the offline LLM and the real stack (engine, worker, frontend processes
over sockets) give the same text, token counts, finish reasons, logprobs and errors, because both
run the request processor (shared.processor). The checkpoint's generation_config carries defaults
(top_k, repetition_penalty, max_new_tokens) that both must apply to the fields a request leaves
unset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_stack import Stack
from frontend_helpers import wait_until

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.timeout(600)

MAX_MODEL_LEN = 96
FLAGS = ("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(16 << 20))
MODEL_DEFAULTS = {"top_k": 40, "repetition_penalty": 1.1, "max_new_tokens": 12}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(model_dirs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "model"
    shutil.copytree(model_dirs("llama"), path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **MODEL_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory) -> Iterator[Stack]:
    st = Stack(model, tmp_path_factory.mktemp("parity-logs"), engine_flags=FLAGS)
    try:
        st.start_worker()
        engine = st.start_engine()
        front = st.start_frontend("fe-a")
        st.wait_frontend_ready("fe-a", front)
        wait_until(f"{st.base}/health", engine, timeout=60)
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    return LLM(str(model), max_model_len=MAX_MODEL_LEN, kv_cache_memory=16 << 20)


def _stop_string(llm: LLM) -> str:
    """A piece of the greedy continuation of PROMPT, so the stop string is sure to be met."""
    text = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    text = text[0].outputs[0].text
    return text[len(text) // 2 : len(text) // 2 + 2]


# (name, HTTP body fields, SamplingParams fields); the stop string "<STOP>" is filled in at run time.
CASES = [
    ("greedy", {"temperature": 0, "max_tokens": 8}, {"temperature": 0, "max_tokens": 8}),
    ("model_defaults", {"seed": 5}, {"seed": 5}),
    ("every_field", {
        "temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "presence_penalty": 0.5,
        "frequency_penalty": 0.3, "repetition_penalty": 1.2, "seed": 11, "max_tokens": 10, "min_tokens": 2,
        "logit_bias": {"100": 5.0}, "stop_token_ids": [7], "ignore_eos": True, "skip_special_tokens": False,
    }, {
        "temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "presence_penalty": 0.5,
        "frequency_penalty": 0.3, "repetition_penalty": 1.2, "seed": 11, "max_tokens": 10, "min_tokens": 2,
        "logit_bias": {100: 5.0}, "stop_token_ids": [7], "ignore_eos": True, "skip_special_tokens": False,
    }),
    ("n3_seeded", {"n": 3, "seed": 2, "temperature": 1.0, "max_tokens": 6}, {"n": 3, "seed": 2, "temperature": 1.0,
                                                                          "max_tokens": 6}),
    ("stop_string", {"temperature": 0, "max_tokens": 12, "stop": ["<STOP>"], "ignore_eos": True},
     {"temperature": 0, "max_tokens": 12, "stop": ["<STOP>"], "ignore_eos": True}),
    ("stop_kept", {"temperature": 0, "max_tokens": 12, "stop": "<STOP>", "include_stop_str_in_output": True,
                   "ignore_eos": True},
     {"temperature": 0, "max_tokens": 12, "stop": ["<STOP>"], "include_stop_str_in_output": True, "ignore_eos": True}),
    ("logprobs", {"temperature": 0, "max_tokens": 5, "logprobs": 3}, {"temperature": 0, "max_tokens": 5, "logprobs": 3}),
    ("regex", {"temperature": 0.7, "seed": 3, "max_tokens": 12, "structured_outputs": {"regex": "[0-9]{4}"}},
     {"temperature": 0.7, "seed": 3, "max_tokens": 12, "structured_outputs": StructuredOutputsParams(regex="[0-9]{4}")}),
]


def _filled(fields: dict, stop: str) -> dict:
    def fill(value):
        if value == "<STOP>":
            return stop
        return [fill(v) for v in value] if isinstance(value, list) else value
    return {k: fill(v) for k, v in fields.items()}


def _served(stack: Stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack.base}/v1/{path}", json=body, timeout=120)


@pytest.mark.parametrize("name,body,params", CASES, ids=[c[0] for c in CASES])
def test_completion_parity(stack, llm, name, body, params):
    stop = _stop_string(llm)
    body, params = _filled(body, stop), _filled(params, stop)
    offline = llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    resp = _served(stack, "completions", {"prompt": PROMPT, **body})
    assert resp.status_code == 200, resp.text
    served = resp.json()
    assert [c["text"] for c in served["choices"]] == [o.text for o in offline.outputs]
    assert [(c["finish_reason"], c["stop_reason"]) for c in served["choices"]] == [
        (o.finish_reason, o.stop_reason) for o in offline.outputs]
    assert served["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in offline.outputs)
    assert served["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    if name.startswith("stop"):
        assert offline.outputs[0].finish_reason == "stop" and offline.outputs[0].stop_reason == stop
    if name == "model_defaults":  # max_new_tokens of the checkpoint, unless EOS came first
        assert len(offline.outputs[0].token_ids) <= MODEL_DEFAULTS["max_new_tokens"]
    if "logprobs" in body:
        for choice, out in zip(served["choices"], offline.outputs):
            lp = choice["logprobs"]
            assert lp["tokens"] == [d[t].decoded_token for d, t in zip(out.logprobs, out.token_ids)]
            assert lp["token_logprobs"] == pytest.approx([d[t].logprob for d, t in zip(out.logprobs, out.token_ids)],
                                                         abs=1e-4)
            assert [sorted(top) for top in lp["top_logprobs"]] == [
                sorted(x.decoded_token for x in d.values()) for d in out.logprobs]


def test_chat_parity_runs_to_the_model_default(stack, llm):
    """Chat without max_tokens: the checkpoint's max_new_tokens in both (the rest of the context
    when it has none); the same template, tokens and text."""
    messages = [{"role": "user", "content": "Say something"}]
    offline = llm.chat(messages, SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    resp = _served(stack, "chat/completions", {"messages": messages, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == offline.text and choice["finish_reason"] == offline.finish_reason
    assert resp.json()["usage"]["completion_tokens"] == len(offline.token_ids) == MODEL_DEFAULTS["max_new_tokens"]


def test_continue_final_message_continues_the_last_message_both_ways(stack, llm):
    """vLLM's continue_final_message: the assistant's last message stays open (no end of turn) and
    the model writes on from it; with add_generation_prompt left on, the same 400 / ValueError."""
    messages = [{"role": "user", "content": "Say something"}, {"role": "assistant", "content": "Here it is:"}]
    fields = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    (offline,) = llm.chat(messages, SamplingParams(**fields), use_tqdm=False, add_generation_prompt=False,
                          continue_final_message=True)
    closed = llm.chat(messages, SamplingParams(**fields), use_tqdm=False, add_generation_prompt=False)[0]
    assert offline.prompt.endswith("Here it is:") and not closed.prompt.endswith("Here it is:")
    body = {"messages": messages, **fields, "add_generation_prompt": False, "continue_final_message": True}
    resp = _served(stack, "chat/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == offline.outputs[0].text
    assert resp.json()["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    resp = _served(stack, "chat/completions", {**body, "add_generation_prompt": True})
    assert resp.status_code == 400, resp.text
    with pytest.raises(ValueError) as refused:
        llm.chat(messages, SamplingParams(**fields), use_tqdm=False, continue_final_message=True)
    assert resp.json()["error"]["message"] == str(refused.value)
    assert "continue_final_message and add_generation_prompt are not compatible" in str(refused.value)


BAD = [
    ("oov_stop_token_ids", {"stop_token_ids": [10**6]}),
    ("oov_logit_bias", {"logit_bias": {str(10**6): 1.0}}),
    ("max_tokens_past_context", {"max_tokens": MAX_MODEL_LEN}),
]


@pytest.mark.parametrize("name,fields", BAD, ids=[b[0] for b in BAD])
def test_bad_values_fail_with_the_same_message(stack, llm, name, fields):
    resp = _served(stack, "completions", {"prompt": PROMPT, **fields})
    assert resp.status_code == 400, resp.text
    params = {k: ({int(t): v for t, v in val.items()} if k == "logit_bias" else val) for k, val in fields.items()}
    with pytest.raises(ValueError) as offline:
        llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    assert resp.json()["error"]["message"] == str(offline.value)


def test_a_grammar_that_does_not_compile_fails_its_request_alone(stack, llm):
    bogus = {"json": {"type": "bogus"}}
    resp = _served(stack, "completions", {"prompt": PROMPT, "max_tokens": 4, "structured_outputs": bogus})
    assert resp.status_code == 400, resp.text
    bad, good = llm.generate([PROMPT, PROMPT], [
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**bogus)),
        SamplingParams(max_tokens=4, ignore_eos=True)], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and bad.outputs[0].error == resp.json()["error"]["message"]
    assert len(good.outputs[0].token_ids) == 4
    after = _served(stack, "completions", {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2  # still serving
