"""The real stack as processes: `pagedserve engine`, `pagedserve worker` and two `pagedserve
frontend`s sharing one port, driven by the official openai SDK (sync, async, streaming) and raw
HTTP. Outputs are checked against the offline LLM; aborts are checked through the engine itself
(a raw Ping: its Pong counts the requests it is running)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from frontend_helpers import Proc, free_port, metric_value, wait_until

from shared.protocol import EngineMessage, FrontendMessage, Ping, Pong
from shared.transport import DealerQueue

pytestmark = pytest.mark.timeout(300)

API_KEY = "e2e-key"
MAX_MODEL_LEN = 1024
ENGINE_FLAGS = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(16 << 20)]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


class Stack:
    def __init__(self, model: Path, logs: Path):
        self.model, self.logs = model, logs
        self.inp, self.out, self.wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.metrics_ports: dict[str, int] = {}

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(["-m", "pagedserve.cli", *args], self.logs / f"{name}.log", env={"PAGEDSERVE_LOG_LEVEL": "WARNING"})
        self.procs.append(proc)
        return proc

    def start_frontend(self, frontend_id: str) -> Proc:
        self.metrics_ports[frontend_id] = port = free_port()
        return self.start(frontend_id, "frontend", "--engine-input", self.inp, "--engine-output", self.out,
                          "--port", str(self.port), "--api-key", API_KEY, "--frontend-id", frontend_id,
                          "--metrics-port", str(port), "--log-level", "warning")

    def metrics(self, frontend_id: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[frontend_id]}/metrics", timeout=5).text

    def wait_frontend_ready(self, frontend_id: str, proc: Proc, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, proc.log()
            try:
                if metric_value(self.metrics(frontend_id), "pagedserve_frontend_engine_ready") == 1:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{frontend_id} never became ready:\n{proc.log()[-3000:]}")

    def engine_load(self) -> Pong:
        """Ask the engine directly how many requests it holds."""
        import zmq

        ctx, ident = zmq.Context(), uuid.uuid4().hex.encode()
        tx = DealerQueue(ctx, self.inp, EngineMessage, FrontendMessage, identity=ident)
        rx = DealerQueue(ctx, self.out, EngineMessage, FrontendMessage, identity=ident)
        try:
            time.sleep(0.05)  # let the output connection register before the answer is routed
            tx.send(Ping(1))
            pong = rx.recv(timeout_ms=10_000)
            assert isinstance(pong, Pong), pong
            return pong
        finally:
            tx.close()
            rx.close()
            ctx.term()

    def close(self) -> None:
        for proc in reversed(self.procs):  # frontends first (Goodbye), then engine, then worker
            proc.close()


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory) -> Iterator[Stack]:
    st = Stack(model_dirs("llama"), tmp_path_factory.mktemp("e2e-logs"))
    try:
        st.start("worker", "worker", "--model", str(st.model), *ENGINE_FLAGS, "--worker-addr", st.wrk)
        engine = st.start("engine", "engine", "--model", str(st.model), *ENGINE_FLAGS, "--frontend-input", st.inp,
                          "--frontend-output", st.out, "--worker-addr", st.wrk)
        fronts = {fid: st.start_frontend(fid) for fid in ("fe-a", "fe-b")}
        for fid, proc in fronts.items():
            st.wait_frontend_ready(fid, proc)
        wait_until(f"{st.base}/health", engine, timeout=60)
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


def _wait_engine_idle(stack: Stack, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pong = stack.engine_load()
        if pong.num_running == 0 and pong.num_waiting == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the engine still holds requests after {timeout}s")


def _wait_engine_busy(stack: Stack, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.engine_load().num_running == 0:
        assert time.monotonic() < deadline, "the request never started running"


def test_client_disconnect_aborts_in_engine(stack, client):
    model = _model(client)
    # ~1000 tokens: seconds of work, so the request is still running when its client leaves.
    long = {"model": model, "prompt": "def f():", "max_tokens": MAX_MODEL_LEN - 24, "ignore_eos": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{stack.base}/v1/completions", json={**long, "stream": True}, headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert stack.engine_load().num_running == 1
    _wait_engine_idle(stack, 2.0)
    # A non-streaming client that hangs up while waiting for its answer.
    body = json.dumps({**long, "messages": [{"role": "user", "content": "go"}]}).encode()
    with socket.create_connection(("127.0.0.1", stack.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_engine_busy(stack)
    _wait_engine_idle(stack, 2.0)
    assert httpx.get(f"{stack.base}/health").status_code == 200
    assert client.completions.create(model=model, prompt="after", max_tokens=3).usage.completion_tokens == 3


def test_bad_input_matrix(stack, client):
    model = _model(client)
    url, auth = f"{stack.base}/v1/completions", {"authorization": f"Bearer {API_KEY}"}
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
