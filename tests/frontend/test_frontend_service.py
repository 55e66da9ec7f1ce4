"""One frontend process against the scripted engine: OpenAI SDK and raw HTTP, every endpoint,
stop strings, n > 1, logprobs, usage, the bad-input matrix, and aborts on client disconnect."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from frontend_helpers import free_port, metric_value, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(frontend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{frontend}/v1", api_key="unused", max_retries=0)


def expected_text(fake_engine, tokenizer, prompt: str, n_tokens: int, seed: int | None = None) -> str:
    ids = fake_engine.next_tokens(tokenizer.encode(prompt), seed, n_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_models_version_tokenize(frontend, client, tokenizer):
    models = client.models.list().data
    assert [m.id for m in models] == ["fake-model"]
    assert models[0].model_extra["max_model_len"] == 128
    assert httpx.get(f"{frontend}/version").json()["version"]
    out = httpx.post(f"{frontend}/tokenize", json={"model": "fake-model", "prompt": "Hello world"}).json()
    assert out == {"tokens": tokenizer.encode("Hello world"), "count": len(out["tokens"]), "max_model_len": 128}
    chat = httpx.post(f"{frontend}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert tokenizer.decode(chat["tokens"]) == "<|user|>hi\n<|assistant|>"
    back = httpx.post(f"{frontend}/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


def test_completion_whole_and_streamed(client, fake_engine, tokenizer):
    want = expected_text(fake_engine, tokenizer, "Hello", 6)
    out = client.completions.create(model="fake-model", prompt="Hello", max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == want
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(tokenizer.encode("Hello")), 6)
    chunks = list(client.completions.create(
        model="fake-model", prompt="Hello", max_tokens=6, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_prompt_forms_and_echo(client, fake_engine, tokenizer):
    ids = tokenizer.encode("Hello")
    out = client.completions.create(model="fake-model", prompt=[ids, tokenizer.encode("two")], max_tokens=3, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == "Hello" + expected_text(fake_engine, tokenizer, "Hello", 3)
    assert out.choices[1].text.startswith("two")
    assert out.usage.prompt_tokens == len(ids) + len(tokenizer.encode("two"))
    out = client.completions.create(model="fake-model", prompt=["Hello", "two"], max_tokens=3, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[1].text == expected_text(fake_engine, tokenizer, "Hello", 3)
    out = client.completions.create(model="fake-model", prompt=ids, max_tokens=3)
    assert out.choices[0].text == expected_text(fake_engine, tokenizer, "Hello", 3)
    chunks = list(client.completions.create(model="fake-model", prompt="Hello", max_tokens=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello" + expected_text(fake_engine, tokenizer, "Hello", 3)


def test_chat_whole_and_streamed(client, fake_engine, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    prompt = "<|user|>hi\n<|assistant|>"
    want = expected_text(fake_engine, tokenizer, prompt, 5)
    out = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(tokenizer.encode(prompt)) + 5


def test_n_fans_out_with_child_seeds(client, fake_engine, tokenizer):
    out = client.completions.create(model="fake-model", prompt="Hello", max_tokens=4, n=2, seed=3, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [expected_text(fake_engine, tokenizer, "Hello", 4, s) for s in (3, 4)]
    assert out.usage.completion_tokens == 8
    seeds = sorted(a.sampling_params.seed for a in fake_engine.added[-2:])
    assert seeds == [3, 4] and all(a.sampling_params.n == 1 for a in fake_engine.added[-2:])


def test_stop_string_cuts_text_and_aborts(client, fake_engine, tokenizer):
    full = expected_text(fake_engine, tokenizer, "Hello", 40)
    stop = " five"
    assert stop in full
    out = client.completions.create(model="fake-model", prompt="Hello", max_tokens=40, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == stop
    req_id = fake_engine.added[-1].req_id
    assert fake_engine.wait_for(lambda: req_id in fake_engine.aborted or req_id in fake_engine.finished)
    streamed = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stop=stop, max_tokens=40, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert stop not in text


def test_logprobs_shapes(client):
    out = client.completions.create(model="fake-model", prompt="Hello", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text and lp.token_logprobs[0] == -0.25
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert bytes(b for c in content for b in c.bytes).decode() == chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, stream=True
    )
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 3


BAD_BODIES = [
    (b"{not json", 400, "invalid_json", None),
    (b"", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"model": "fake-model"}, 400, "missing_required_parameter", "prompt"),
    ({"model": "fake-model", "prompt": "x", "max_tokens": "ten"}, 400, "invalid_type", "max_tokens"),
    ({"model": "fake-model", "prompt": "x", "temperature": -1}, 400, "invalid_value", "temperature"),
    ({"model": "fake-model", "prompt": "x", "n": 1000}, 400, "invalid_value", "n"),
    ({"model": "fake-model", "prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "invalid_value", "min_tokens"),
    ({"model": "fake-model", "prompt": "x", "stop": ""}, 400, "invalid_value", "stop"),
    ({"model": "fake-model", "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ({"model": "fake-model", "prompt": "x", "stop_token_ids": [99999]}, 400, "invalid_value", "stop_token_ids"),
    ({"model": "fake-model", "prompt": [[]]}, 400, "invalid_value", "prompt"),
    ({"model": "fake-model", "prompt": [5] * 128}, 400, "context_length_exceeded", "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_BODIES)
def test_bad_completion_requests(frontend, body, status, code, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    resp = httpx.post(f"{frontend}/v1/completions", timeout=10, **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param), err


def test_bad_chat_requests_and_engine_refusal(frontend, client, fake_engine):
    resp = httpx.post(f"{frontend}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2000}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    resp = httpx.post(f"{frontend}/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    fake_engine.refuse_next = "the engine says no"
    with pytest.raises(openai.BadRequestError, match="the engine says no"):
        client.completions.create(model="fake-model", prompt="Hello", max_tokens=2)
    fake_engine.refuse_next = "no stream either"
    with pytest.raises(openai.BadRequestError, match="no stream either"):
        list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))
    assert httpx.get(f"{frontend}/nowhere").json()["error"]["code"] == "not_found"
    # still serving
    assert client.completions.create(model="fake-model", prompt="Hello", max_tokens=2).choices[0].text


def _slow(fake_engine):
    class Slow:
        def __enter__(self):
            self.old, fake_engine.step_s = fake_engine.step_s, 0.05

        def __exit__(self, *exc):
            fake_engine.step_s = self.old

    return Slow()


def test_client_disconnect_aborts_streaming_and_whole(frontend, fake_engine):
    with _slow(fake_engine):
        body = {"model": "fake-model", "prompt": "Hello", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{frontend}/v1/completions", json=body, timeout=10) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            req_id = fake_engine.added[-1].req_id
        assert fake_engine.wait_for(lambda: req_id in fake_engine.aborted, 5), "streaming request not aborted"
        body["stream"] = False
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{frontend}/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
        req_id = fake_engine.added[-1].req_id
        assert fake_engine.wait_for(lambda: req_id in fake_engine.aborted, 5), "whole request not aborted"
    assert httpx.get(f"{frontend}/health").status_code == 200


def test_streamed_sse_ends_with_done(frontend):
    body = {"model": "fake-model", "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{frontend}/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def _request_reason(reasons: list[str]) -> str:
    """The request-level finish reason the metrics document for several choices."""
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


def test_metrics_match_what_clients_saw(frontend, client, fake_engine):
    before = httpx.get(f"{frontend}/metrics").text
    outs = [
        ("/v1/completions", client.completions.create(model="fake-model", prompt="Hello", max_tokens=4, n=2,
                                                      seed=3, temperature=1.0)),
        ("/v1/completions", client.completions.create(model="fake-model", prompt="Hello", max_tokens=40,
                                                      stop=[" five"])),
        ("/v1/chat/completions", client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)),
    ]
    chunks = list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))
    reasons = [_request_reason([c.finish_reason for c in out.choices]) for _, out in outs]
    reasons.append(_request_reason([c.choices[0].finish_reason for c in chunks if c.choices and
                                    c.choices[0].finish_reason]))
    usages = [out.usage for _, out in outs] + [chunks[-1].usage]
    endpoints = [e for e, _ in outs] + ["/v1/chat/completions"]
    num_choices = [len(out.choices) for _, out in outs] + [1]
    assert reasons == ["length", "stop", "length", "length"]
    after = httpx.get(f"{frontend}/metrics").text

    def delta(name: str, **labels: str) -> float:
        labels = {"model_name": "fake-model", **labels}
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
    assert metric_value(after, "pagedserve_frontend_engine_ready", model_name="fake-model") == 1
    samples = [line for line in after.splitlines() if line and not line.startswith("#")]
    assert all('model_name="' in line for line in samples), [s for s in samples if "model_name" not in s]


def test_metrics_count_aborts_and_errors(frontend, client, fake_engine):
    def value(name: str, **labels: str) -> float:
        return metric_value(httpx.get(f"{frontend}/metrics").text, name, model_name="fake-model", **labels)

    def reasons() -> dict[str, float]:
        return {r: value("pagedserve_frontend_requests_total", finish_reason=r) for r in ("abort", "error")}

    start, e2e = reasons(), value("pagedserve_frontend_e2e_request_latency_seconds_count")
    fake_engine.refuse_next = "no"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-model", prompt="Hello", max_tokens=2)
    with _slow(fake_engine):
        body = {"model": "fake-model", "prompt": "Hello", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{frontend}/v1/completions", json=body, timeout=10) as resp:
            assert next(resp.iter_lines()).startswith("data: ")
        assert fake_engine.wait_for(lambda: value("pagedserve_frontend_requests_in_flight") == 0, 5)
    end = reasons()
    assert (end["abort"] - start["abort"], end["error"] - start["error"]) == (1, 1)
    assert value("pagedserve_frontend_e2e_request_latency_seconds_count") - e2e == 2


def test_api_key(fake_engine, start_frontend):
    port = free_port()
    proc = start_frontend(port, fake_engine, "--api-key", "sekrit", "--served-model-name", "alias")
    base = f"http://127.0.0.1:{port}"
    wait_until(f"{base}/health", proc)  # /health is not behind the key
    body = {"model": "alias", "prompt": "Hello", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sekrit"}):
        resp = httpx.post(f"{base}/v1/completions", json=body, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
    assert ok.completions.create(**body).model == "alias"
    with pytest.raises(openai.NotFoundError):
        ok.completions.create(model="fake-model", prompt="x", max_tokens=2)
