"""Request models, error shapes, logprob shapes and per-request metrics, in process (no engine, no
sockets)."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from services.frontend.errors import validation_error
from services.frontend.logprobs import chat_logprobs, completion_logprobs
from services.frontend.metrics import FrontendMetrics
from services.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from services.frontend.request_metrics import RequestMetrics
from shared.processor.defaults import merge_model_defaults
from shared.processor.outcome import request_finish_reason
from shared.processor.token_text import TokenText
from shared.protocol import TokenLogprobs


def _err(model, **body) -> dict:
    with pytest.raises(ValidationError) as info:
        model(**body)
    # FastAPI reports body errors with a leading "body" location; mirror that.
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return validation_error(errors).body()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({}, "prompt"),
    ],
)
def test_completion_request_errors_name_the_parameter(body, param):
    err = _err(CompletionRequest, **body)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    assert param in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
def test_chat_request_errors_name_the_parameter(body, param):
    assert _err(ChatCompletionRequest, **body)["param"] == param


def test_prompt_forms_are_accepted():
    for prompt in ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]:
        assert CompletionRequest(prompt=prompt).prompt == prompt


def test_sampling_params_take_defaults_only_where_unset():
    defaults = {"temperature": 0.7, "top_k": 20, "max_tokens": 50}
    req = CompletionRequest(prompt="x", temperature=0.0, stop="END", logprobs=2, n=3, seed=7)
    params = merge_model_defaults(req.to_sampling_params(), defaults, 16)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 20, 50)
    assert params.stop == ["END"] and params.logprobs == 2 and params.n == 3 and params.seed == 7
    assert merge_model_defaults(CompletionRequest(prompt="x").to_sampling_params(), {}, 16).max_tokens == 16
    five = CompletionRequest(prompt="x", max_tokens=5).to_sampling_params()
    assert merge_model_defaults(five, defaults, 16).max_tokens == 5


def test_chat_params_prefer_max_completion_tokens_and_map_logprobs():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    req = ChatCompletionRequest(messages=msgs, max_tokens=9, max_completion_tokens=4, logprobs=True, top_logprobs=3)
    params = req.to_sampling_params()
    assert params.max_tokens == 4 and params.logprobs == 3
    unset = ChatCompletionRequest(messages=msgs).to_sampling_params()
    assert merge_model_defaults(unset, {}, None).max_tokens is None
    assert ChatCompletionRequest(messages=msgs, logprobs=True).to_sampling_params().logprobs == 0
    assert req.template_messages() == [{"role": "user", "content": "a\nb"}]


def test_malformed_json_and_missing_body_errors():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting value"}}]).body()["error"]
    assert err["code"] == "invalid_json" and "Expecting value" in err["message"]
    err = validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}]).body()["error"]
    assert err["code"] == "invalid_json"


def test_logprob_shapes(tokenizer):
    texts = TokenText(tokenizer)
    ids = tokenizer.encode("Hello world")
    entries = [TokenLogprobs([t, 5, 6], [-0.5, -1.0, -2.0], 1) for t in ids]
    comp, end = completion_logprobs(entries, texts, 2, 0)
    assert "".join(comp.tokens) == "Hello world" and end == len("Hello world")
    assert comp.token_logprobs == [-0.5] * len(ids) and comp.text_offset[0] == 0
    assert all(len(top) >= 2 for top in comp.top_logprobs)
    chat = chat_logprobs(entries, texts, 1)
    assert [c.token for c in chat.content] == comp.tokens
    assert all(len(c.top_logprobs) == 1 for c in chat.content)
    assert bytes(b for c in chat.content for b in c.bytes).decode() == "Hello world"


def test_token_bytes_rebuild_split_characters(tokenizer):
    texts = TokenText(tokenizer)
    ids = tokenizer.encode("日本語 🙂")
    raw = bytes(b for t in ids for b in texts.get(t)[1])
    assert raw.decode("utf-8") == "日本語 🙂"


def test_frontend_modules_do_not_import_torch():
    import subprocess

    code = "import sys, services.frontend.server, services.frontend.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("reasons", "failed", "want"),
    [
        (["stop", "stop"], False, "stop"),
        (["stop", "length"], False, "length"),
        (["length", "abort"], False, "abort"),
        (["stop", None], False, "abort"),  # a choice left unfinished: the request was abandoned
        (["abort", "error"], False, "error"),
        (["stop"], True, "error"),
    ],
)
def test_request_finish_reason(reasons, failed, want):
    assert request_finish_reason(reasons, failed) == want


def test_request_metrics_of_two_choices():
    metrics = FrontendMetrics("fe", "m")
    req = RequestMetrics(metrics, "/v1/completions", arrival=10.0)
    req.start()
    assert metrics.registry.get_sample_value("pagedserve_frontend_requests_in_flight", {"model_name": "m"}) == 1
    for index, at, count in ((0, 10.5, 1), (1, 10.6, 1), (0, 10.7, 2), (1, 11.0, 1), (0, 11.5, 1)):
        req.on_tokens(index, count, at)
    req.finish("length", 7, [4, 2], now=12.0)
    req.finish("length", 7, [4, 2], now=13.0)  # counted once

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"pagedserve_frontend_{name}", {"model_name": "m", **labels})

    assert value("requests_total", endpoint="/v1/completions", finish_reason="length") == 1
    assert value("requests_in_flight") == 0
    assert value("time_to_first_token_seconds_sum") == pytest.approx(0.5)
    # Gaps per choice: 0.2 and 0 (a two-token delta), then 0.8; choice 1: 0.4.
    assert value("inter_token_latency_seconds_count") == 4
    assert value("inter_token_latency_seconds_sum") == pytest.approx(1.4)
    assert value("time_per_output_token_seconds_sum") == pytest.approx(1.5 / 3)  # the longest choice's pace
    assert value("e2e_request_latency_seconds_sum") == pytest.approx(2.0)
    assert (value("prompt_tokens_total"), value("generation_tokens_total")) == (7, 6)
    assert (value("prompt_tokens_sum"), value("generation_tokens_sum")) == (7, 6)
