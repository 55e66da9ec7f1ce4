"""One frontend process against the real engine and worker (the tiny llama checkpoint): OpenAI SDK
and raw HTTP, every endpoint, stop strings, n > 1, usage, server-sent events, and metrics that match
what the clients saw. Expected outputs come from the model's own greedy answers, which are
deterministic. What the frontend refuses or cuts short is in test_frontend_refusals.py."""

from __future__ import annotations

import json

import httpx
import pytest
from frontend_helpers import GREEDY, metric_value

pytestmark = pytest.mark.timeout(120)

MAX_MODEL_LEN = 1024  # e2e_stack.ENGINE_FLAGS


def chat_prompt_ids(model_tokenizer, messages: list[dict]) -> list[int]:
    text = model_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model_tokenizer.encode(text, add_special_tokens=False)


def test_models_version_tokenize(frontend, client, model, model_tokenizer, model_path):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{frontend}/version").json()["version"]
    out = httpx.post(f"{frontend}/tokenize", json={"model": model, "prompt": "Hello world"}).json()
    assert out == {"tokens": model_tokenizer.encode("Hello world"), "count": len(out["tokens"]),
                   "max_model_len": MAX_MODEL_LEN}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{frontend}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == chat_prompt_ids(model_tokenizer, messages)
    back = httpx.post(f"{frontend}/detokenize", json={"tokens": model_tokenizer.encode("Hello world",
                                                                                       add_special_tokens=False)})
    assert back.json() == {"prompt": "Hello world"}


def test_completion_whole_and_streamed(client, model, model_tokenizer, greedy):
    out = client.completions.create(model=model, prompt="Hello", max_tokens=6, **GREEDY)
    assert out.object == "text_completion" and out.choices[0].text == greedy("Hello", 6)
    assert out.choices[0].text  # the tiny model says something
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(model_tokenizer.encode("Hello")), 6)
    chunks = list(client.completions.create(
        model=model, prompt="Hello", max_tokens=6, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy("Hello", 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_prompt_forms_and_echo(client, model, model_tokenizer, greedy):
    ids = model_tokenizer.encode("Hello")
    two = model_tokenizer.encode("two")
    out = client.completions.create(model=model, prompt=[ids, two], max_tokens=3, echo=True, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == "Hello" + greedy("Hello", 3)
    assert out.choices[1].text == "two" + greedy("two", 3)
    assert out.usage.prompt_tokens == len(ids) + len(two)
    out = client.completions.create(model=model, prompt=["Hello", "two"], max_tokens=3, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [greedy("Hello", 3)] * 2 + [greedy("two", 3)] * 2  # greedy twins
    out = client.completions.create(model=model, prompt=ids, max_tokens=3, **GREEDY)
    assert out.choices[0].text == greedy("Hello", 3)
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=3, echo=True, stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == "Hello" + greedy("Hello", 3)


def test_chat_whole_and_streamed(client, model, model_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=5, **GREEDY)
    want = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and want
    assert out.usage.prompt_tokens == len(chat_prompt_ids(model_tokenizer, messages))
    assert out.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(chat_prompt_ids(model_tokenizer, messages)) + 5


def test_n_fans_out_with_child_seeds(client, model):
    sampled = {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2, seed=3, **sampled)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 8
    # Choice i is sampled with seed + i: the same texts as single requests with those seeds.
    singles = [client.completions.create(model=model, prompt="Hello", max_tokens=4, seed=s, **sampled).choices[0].text
               for s in (3, 4)]
    assert [c.text for c in out.choices] == singles


def _stop_for(text: str) -> str:
    """A stop string cut from a known output: a few characters from its middle, first seen there."""
    for start in range(4, len(text) - 3):
        stop = text[start:start + 3]
        if stop.strip() and text.index(stop) == start:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_text_and_aborts(stack, client, model, greedy):
    full = greedy("Hello", 40)
    stop = _stop_for(full)
    out = client.completions.create(model=model, prompt="Hello", max_tokens=40, stop=[stop], **GREEDY)
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == stop
    stack.wait_engine_idle(10.0)  # the engine does not go on generating the rest
    messages = [{"role": "user", "content": "hi"}]
    chat_full = client.chat.completions.create(model=model, messages=messages, max_tokens=40,
                                               **GREEDY).choices[0].message.content
    chat_stop = _stop_for(chat_full)
    streamed = client.chat.completions.create(model=model, messages=messages, stop=chat_stop, max_tokens=40,
                                              stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert chat_stop not in text and text == chat_full[: chat_full.index(chat_stop)]


def test_streamed_sse_ends_with_done(frontend, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{frontend}/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def _request_reason(reasons: list[str]) -> str:
    """The request-level finish reason the metrics document for several choices."""
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


def test_metrics_match_what_clients_saw(frontend, client, model, greedy):
    stop = _stop_for(greedy("Hello", 40))
    before = httpx.get(f"{frontend}/metrics").text
    outs = [
        ("/v1/completions", client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2, seed=3,
                                                      temperature=1.0, extra_body={"ignore_eos": True})),
        ("/v1/completions", client.completions.create(model=model, prompt="Hello", max_tokens=40, stop=[stop],
                                                      **GREEDY)),
        ("/v1/chat/completions", client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, **GREEDY)),
    ]
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY))
    reasons = [_request_reason([c.finish_reason for c in out.choices]) for _, out in outs]
    reasons.append(_request_reason([c.choices[0].finish_reason for c in chunks if c.choices and
                                    c.choices[0].finish_reason]))
    usages = [out.usage for _, out in outs] + [chunks[-1].usage]
    endpoints = [e for e, _ in outs] + ["/v1/chat/completions"]
    num_choices = [len(out.choices) for _, out in outs] + [1]
    assert reasons == ["length", "stop", "length", "length"]
    after = httpx.get(f"{frontend}/metrics").text

    def delta(name: str, **labels: str) -> float:
        labels = {"model_name": model, **labels}
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        for reason in ("stop", "length", "abort", "error"):
            want = sum(e == endpoint and r == reason for e, r in zip(endpoints, reasons))
            assert delta("pagedserve_frontend_requests_total", endpoint=endpoint, finish_reason=reason) == want
        want = endpoints.count(endpoint)
        assert delta("pagedserve_frontend_http_responses_total", endpoint=endpoint, status="200") == want
    generated = sum(u.completion_tokens for u in usages)
    prompted = sum(u.prompt_tokens for u in usages)
    assert delta("pagedserve_frontend_generation_tokens_total") == generated
    assert delta("pagedserve_frontend_generation_tokens_sum") == generated
    assert delta("pagedserve_frontend_prompt_tokens_total") == prompted
    assert delta("pagedserve_frontend_prompt_tokens_sum") == prompted
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "prompt_tokens", "generation_tokens"):
        assert delta(f"pagedserve_frontend_{name}_count") == 4, name
    paced = sum(u.completion_tokens > n for u, n in zip(usages, num_choices))  # over one token per choice
    assert delta("pagedserve_frontend_time_per_output_token_seconds_count") == paced
    # One gap per token after each choice's first.
    assert delta("pagedserve_frontend_inter_token_latency_seconds_count") == generated - sum(num_choices)
    assert metric_value(after, "pagedserve_frontend_requests_in_flight") == 0
    assert metric_value(after, "pagedserve_frontend_engine_ready", model_name=model) == 1
    samples = [line for line in after.splitlines() if line and not line.startswith("#")]
    assert all('model_name="' in line for line in samples), [s for s in samples if "model_name" not in s]
