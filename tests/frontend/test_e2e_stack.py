"""The real stack as processes: `pagedserve engine`, `pagedserve worker` and two `pagedserve
frontend`s sharing one port, driven by the official openai SDK (sync, async, streaming) and raw
HTTP. Outputs are checked against the offline LLM; aborts are checked through the engine itself
(a raw Ping: its Pong counts the requests it is running)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from e2e_stack import Stack
from frontend_helpers import GREEDY, metric_value, wait_until

pytestmark = pytest.mark.timeout(300)

API_KEY = "e2e-key"
MAX_MODEL_LEN = 1024  # e2e_stack.ENGINE_FLAGS


@pytest.fixture(scope="module")
def stack(backend, tmp_path_factory) -> Iterator[Stack]:
    """Two keyed frontends on the session's engine and worker."""
    backend.check_running()
    st = backend.sharing(tmp_path_factory.mktemp("e2e-logs"), API_KEY)
    try:
        fronts = {fid: st.start_frontend(fid) for fid in ("fe-a", "fe-b")}
        for fid, proc in fronts.items():
            st.wait_frontend_ready(fid, proc)
        wait_until(f"{st.base}/health", fronts["fe-a"], timeout=60)
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(stack: Stack):
    from pagedserve import LLM

    return LLM(str(stack.model), max_model_len=MAX_MODEL_LEN, kv_cache_memory=16 << 20)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


PROMPTS = ["def main(args):", "import os\nimport sys\n", "Hello"]


def test_greedy_matches_offline(client, llm):
    from pagedserve import SamplingParams

    model = _model(client)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    offline = llm.generate(PROMPTS, params, use_tqdm=False)
    out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, logprobs=2, **GREEDY)
    for choice, ref in zip(out.choices, offline):
        assert choice.text == ref.outputs[0].text
        want = [lp[tok].logprob for lp, tok in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
        assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-3)
    assert out.usage.completion_tokens == 36
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in offline)
    messages = [{"role": "user", "content": "Write a function."}]
    ref = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, **GREEDY)
    assert chat.choices[0].message.content == ref.outputs[0].text
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 10


def test_n_stop_and_logprobs(client, llm):
    model = _model(client)
    full = client.completions.create(model=model, prompt="def main(args):", max_tokens=24, **GREEDY).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model=model, prompt="def main(args):", max_tokens=24, stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt="def main(args):", max_tokens=24, stop=stop,
                                         stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]
    two = client.completions.create(model=model, prompt="Hello", max_tokens=6, n=2, seed=1, temperature=1.0)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 12
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          n=2, logprobs=True, top_logprobs=3, **GREEDY)
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy twins
    for c in chat.choices:
        assert len(c.logprobs.content) == 5 and all(len(t.top_logprobs) == 3 for t in c.logprobs.content)


def test_async_sdk_concurrent_requests(stack, client):
    model = _model(client)

    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{stack.base}/v1", api_key=API_KEY, max_retries=0)
        async with aclient:
            async def one(i: int) -> str:
                if i % 2:
                    stream = await aclient.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=8, stream=True)
                    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                out = await aclient.completions.create(model=model, prompt=f"n{i}", max_tokens=8)
                return out.choices[0].text

            return await asyncio.gather(*(one(i) for i in range(12)))

    texts = asyncio.run(main())
    assert len(texts) == 12 and all(isinstance(t, str) for t in texts)


def test_both_frontends_serve(stack, client):
    model = _model(client)
    seen = set()
    for _ in range(30):
        resp = httpx.post(f"{stack.base}/v1/completions", headers={"authorization": f"Bearer {API_KEY}"},
                          json={"model": model, "prompt": "x", "max_tokens": 1})
        assert resp.status_code == 200
        seen.add(resp.headers["x-pagedserve-frontend"])
    assert seen == {"fe-a", "fe-b"}
    for fid in ("fe-a", "fe-b"):
        page = stack.metrics(fid)
        assert metric_value(page, "pagedserve_frontend_http_responses_total", endpoint="/v1/completions", status="200") > 0


def test_client_disconnect_aborts_in_engine(stack, client):
    model = _model(client)
    # ~1000 tokens: seconds of work, so the request is still running when its client leaves.
    long = {"model": model, "prompt": "def f():", "max_tokens": MAX_MODEL_LEN - 24, "ignore_eos": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{stack.base}/v1/completions", json={**long, "stream": True}, headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert stack.engine_load().num_running >= 1
    stack.wait_engine_idle(10.0)
    # A non-streaming client that hangs up while waiting for its answer.
    body = json.dumps({**long, "messages": [{"role": "user", "content": "go"}]}).encode()
    with socket.create_connection(("127.0.0.1", stack.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        stack.wait_engine_busy()
    stack.wait_engine_idle(10.0)
    assert httpx.get(f"{stack.base}/health").status_code == 200
    after = client.completions.create(model=model, prompt="after", max_tokens=3, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 3


def test_bad_input_matrix(stack, client):
    model = _model(client)
    url, auth = f"{stack.base}/v1/completions", {"authorization": f"Bearer {API_KEY}"}
    before = stack.idle_metrics()
    cases = [
        ({"content": b"{oops", "headers": {**auth, "content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"model": model, "prompt": "x", "max_tokens": "many"}, "headers": auth}, 400, "invalid_type"),
        ({"json": {"model": model, "prompt": "x", "top_p": 1.5}, "headers": auth}, 400, "invalid_value"),
        ({"json": {"model": model, "prompt": "x", "logprobs": 50}, "headers": auth}, 400, "invalid_value"),
        ({"json": {"model": "other", "prompt": "x"}, "headers": auth}, 404, "model_not_found"),
        ({"json": {"model": model, "prompt": "x " * (2 * MAX_MODEL_LEN)}, "headers": auth}, 400, "context_length_exceeded"),
        ({"json": {"model": model, "prompt": [1, 10**6]}, "headers": auth}, 400, "invalid_value"),
        ({"json": {"model": model, "prompt": "x"}}, 401, "invalid_api_key"),
        ({"json": {"model": model, "prompt": "x"}, "headers": {"authorization": "Bearer nope"}}, 401,
         "invalid_api_key"),
    ]
    for kwargs, status, code in cases:
        resp = httpx.post(url, **kwargs)
        assert resp.status_code == status, (kwargs, resp.text)
        assert resp.json()["error"]["code"] == code, resp.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x " * (2 * MAX_MODEL_LEN)}])
    assert httpx.get(f"{stack.base}/health").status_code == 200
    assert client.completions.create(model=model, prompt="still", max_tokens=2).choices[0].text is not None
    after, labels = stack.idle_metrics(), {"model_name": model}
    for status in ("200", "400", "401", "404"):
        want = sum(str(s) == status for _, s, _ in cases) + (status == "200")  # + "still"
        got = _delta(before, after, "pagedserve_frontend_http_responses_total", endpoint="/v1/completions",
                     status=status, **labels)
        assert got == want, status
    assert _delta(before, after, "pagedserve_frontend_http_responses_total", endpoint="/v1/chat/completions",
                  status="400", **labels) == 1
    # Refused before admission: only "still" is a generation request.
    assert _delta(before, after, "pagedserve_frontend_requests_total", **labels) == 1


def _delta(old: list[str], new: list[str], name: str, **labels: str) -> float:
    """How much ``name`` grew between two scrapes of the same frontends, summed over them."""
    return sum(metric_value(b, name, **labels) - metric_value(a, name, **labels) for a, b in zip(old, new))


def _request_reason(reasons: list[str]) -> str:
    """One HTTP request's finish reason from its choices', as the metrics document it."""
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


def _known_requests(client: openai.OpenAI, model: str) -> list[tuple[str, str, openai.types.CompletionUsage]]:
    """Whole and streamed, n > 1, stop and length: (endpoint, request's finish reason, usage) each."""
    full = client.completions.create(model=model, prompt="def main(args):", max_tokens=8, **GREEDY)
    cut = client.completions.create(model=model, prompt="def main(args):", max_tokens=8,
                                    stop=[full.choices[0].text[3:6]], **GREEDY)
    two = client.completions.create(model=model, prompt="Hi", max_tokens=4, n=2, seed=1)
    out = [("/v1/completions", _request_reason([c.finish_reason for c in o.choices]), o.usage) for o in (full, cut, two)]
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True}))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return [*out, ("/v1/chat/completions", _request_reason(reasons), chunks[-1].usage)]


def test_metrics_match_responses(stack, client):
    model = _model(client)
    labels = {"model_name": model}
    before = stack.idle_metrics()
    finished = _known_requests(client, model)
    assert {r for _, r, _ in finished} == {"stop", "length"}
    mid = stack.idle_metrics()
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        for reason in ("stop", "length", "abort", "error"):
            want = sum(e == endpoint and r == reason for e, r, _ in finished)
            got = _delta(before, mid, "pagedserve_frontend_requests_total", endpoint=endpoint, finish_reason=reason,
                         **labels)
            assert got == want, (endpoint, reason)
        want = sum(e == endpoint for e, _, _ in finished)
        assert _delta(before, mid, "pagedserve_frontend_http_responses_total", endpoint=endpoint, status="200",
                      **labels) == want
    for name, field in (("generation_tokens", "completion_tokens"), ("prompt_tokens", "prompt_tokens")):
        want = sum(getattr(u, field) for _, _, u in finished)
        assert _delta(before, mid, f"pagedserve_frontend_{name}_total", **labels) == want, name
        assert _delta(before, mid, f"pagedserve_frontend_{name}_sum", **labels) == want, name
    # A streaming client that leaves after the first chunk.
    body = {"model": model, "prompt": "def f():", "max_tokens": MAX_MODEL_LEN - 24, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.base}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {API_KEY}"}) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    after = stack.idle_metrics()  # in flight back to 0 on both frontends
    stack.wait_engine_idle(10.0)
    assert _delta(mid, after, "pagedserve_frontend_requests_total", finish_reason="abort", **labels) == 1
    assert _delta(mid, after, "pagedserve_frontend_requests_total", **labels) == 1
    assert _delta(mid, after, "pagedserve_frontend_generation_tokens_total", **labels) >= 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert _delta(before, after, f"pagedserve_frontend_{name}_count", **labels) == len(finished) + 1, name
    assert sum(metric_value(p, "pagedserve_frontend_requests_in_flight", **labels) for p in after) == 0


def _load(stack: Stack, model: str, stop: threading.Event, errors: list[str]) -> None:
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        while not stop.is_set():
            resp = http.post(f"{stack.base}/v1/completions", json={"model": model, "prompt": "load", "max_tokens": 16})
            if resp.status_code != 200:
                errors.append(resp.text)


def test_frontend_joins_under_load(stack, client):
    model = _model(client)
    stop, errors = threading.Event(), []
    loaders = [threading.Thread(target=_load, args=(stack, model, stop, errors)) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        late = stack.start_frontend("fe-late")
        stack.wait_frontend_ready("fe-late", late)
        # The loaders keep their connections (and so their frontends); new connections spread.
        body, headers = {"model": model, "prompt": "new", "max_tokens": 4}, {"authorization": f"Bearer {API_KEY}"}
        for _ in range(60):
            resp = httpx.post(f"{stack.base}/v1/completions", json=body, headers=headers, timeout=60)
            assert resp.status_code == 200, resp.text
            if resp.headers["x-pagedserve-frontend"] == "fe-late":
                break
        else:
            raise AssertionError("the late frontend never served a request")
        page = stack.metrics("fe-late")
        assert metric_value(page, "pagedserve_frontend_http_responses_total", endpoint="/v1/completions", status="200") > 0
    finally:
        stop.set()
        for t in loaders:
            t.join(60)
    assert not errors, errors[:3]
    assert late.terminate() == 0, late.log()
    assert client.completions.create(model=model, prompt="after", max_tokens=2).choices
