"""A frontend is a valid endpoint for the inference gateway's endpoint picker: its /metrics tells
the truth about its engine (queue, batch, KV-cache use, cache config, LoRA info), under pagedserve's
names and, with --vllm-metric-names, under vLLM's too. Real processes over real sockets."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2e_stack import Stack
from frontend_helpers import metric_labels, metric_value

from shared.protocol import EngineMessage, FrontendMessage, Hello, ModelInfo
from shared.transport import DealerQueue

OURS = {
    "waiting": "pagedserve_frontend_engine_requests_waiting",
    "running": "pagedserve_frontend_engine_requests_running",
    "kv": "pagedserve_frontend_engine_kv_cache_usage_ratio",
    "cache": "pagedserve_frontend_cache_config_info",
    "lora": "pagedserve_frontend_lora_requests_info",
}
VLLM = {
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "kv": "vllm:kv_cache_usage_perc",
    "cache": "vllm:cache_config_info",
    "lora": "vllm:lora_requests_info",
}
ENGINE = {
    "waiting": "pagedserve_engine_requests_waiting",
    "running": "pagedserve_engine_requests_running",
    "kv": "pagedserve_engine_kv_cache_usage_ratio",
}
FRONTENDS = ("fe-ours", "fe-vllm")
QUEUED = 5  # requests sent at once: one runs, the others wait
# Each request runs this long, so the one running stays the same through a KV check (2.5 s): the
# tiny model decodes its 1024-token limit in about a second.
MAX_LEN = 32768


@pytest.fixture(scope="module")
def model_path(model_dirs) -> Path:
    """The tiny llama with room for MAX_LEN positions."""
    return model_dirs("llama", config_overrides={"max_position_embeddings": MAX_LEN})


@pytest.fixture(scope="module")
def gw(make_stack) -> Stack:
    """One request runs at a time, so the others wait in the engine's queue."""
    st: Stack = make_stack()
    st.engine_flags = ("--max-model-len", str(MAX_LEN), "--kv-cache-memory", str(64 << 20), "--max-num-seqs", "1")
    st.start_worker()
    st.start_engine()
    procs = {"fe-ours": st.start_frontend("fe-ours"), "fe-vllm": st.start_frontend("fe-vllm", "--vllm-metric-names")}
    for fid, proc in procs.items():
        st.wait_frontend_ready(fid, proc)
    return st


def _model_info(st: Stack) -> ModelInfo:
    """The engine's ModelInfo, asked for directly (a Hello)."""
    import zmq

    ctx, ident = zmq.Context(), uuid.uuid4().hex.encode()
    tx = DealerQueue(ctx, st.inp, EngineMessage, FrontendMessage, identity=ident)
    rx = DealerQueue(ctx, st.out, EngineMessage, FrontendMessage, identity=ident)
    try:
        time.sleep(0.05)
        tx.send(Hello("gateway-test-" + uuid.uuid4().hex[:8]))
        while not isinstance(msg := rx.recv(timeout_ms=10_000), ModelInfo):
            assert msg is not None
        return msg
    finally:
        tx.close()
        rx.close()
        ctx.term()


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _load(page: str, names: dict[str, str]) -> tuple[float, float, float]:
    return tuple(metric_value(page, names[k]) for k in ("waiting", "running", "kv"))


def _idle(page: str) -> bool:
    """The engine's gauges are on the page (a frontend exports none before its first Pong, which
    comes an interval after it is ready) and show an idle engine."""
    return f"{OURS['cache']}{{" in page and _load(page, OURS) == (0, 0, 0)


def test_idle_engine_and_cache_info(gw):
    info = _model_info(gw)
    _wait(lambda: all(_idle(gw.metrics(f)) for f in FRONTENDS), 10, "idle load never shown")
    for fid in FRONTENDS:
        page = gw.metrics(fid)
        cache = metric_labels(page, OURS["cache"])
        assert cache["block_size"] == str(info.block_size) and cache["num_gpu_blocks"] == str(info.num_blocks)
        assert info.num_blocks > 0
        lora = metric_labels(page, OURS["lora"])
        assert (lora["max_lora"], lora["running_lora_adapters"], lora["waiting_lora_adapters"]) == ("0", "", "")
        assert metric_value(page, OURS["lora"]) > 1e9  # the report's Unix time, as vLLM's
        assert f'model_name="{cache["model_name"]}"' in page and cache["model_name"] != "unknown"


def test_vllm_names_only_when_asked(gw):
    ours, theirs = gw.metrics("fe-ours"), gw.metrics("fe-vllm")
    assert "vllm:" not in ours
    for key in OURS:
        assert f"# TYPE {VLLM[key]} gauge" in theirs, key
    drop = {"model_name"}
    for key in ("cache", "lora"):
        vllm = {k: v for k, v in metric_labels(theirs, VLLM[key]).items() if k not in drop}
        assert vllm == {k: v for k, v in metric_labels(theirs, OURS[key]).items() if k not in drop}
    assert _load(theirs, VLLM) == _load(theirs, OURS)


def _stream(st: Stack, model: str, stop: threading.Event, errors: list) -> None:
    """One long generation, held open until ``stop`` (closing it aborts the request)."""
    body = {"model": model, "prompt": "count:", "max_tokens": MAX_LEN - 16, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{st.base}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            for _ in resp.iter_lines():
                if stop.is_set():
                    return
    except Exception as exc:  # noqa: BLE001 (reported by the test)
        errors.append(exc)


def _same_as_engine(st: Stack, fid: str) -> bool:
    """The frontend shows the engine's queue and batch, some requests still waiting."""
    engine = (st.engine_metric(ENGINE["waiting"]), st.engine_metric(ENGINE["running"]))
    return engine[0] > 0 and _load(st.metrics(fid), OURS)[:2] == engine == (st.engine_load().num_waiting, 1)


def _kv_between(st: Stack) -> tuple[float, float, float] | None:
    """KV use grows while one request decodes: a frontend's report (at most a Pong old) lies
    between what it said before the engine's own figure was read and what it says after. None if
    the running request changed meanwhile (the queue moved)."""
    waiting = st.engine_load().num_waiting
    before = metric_value(st.metrics("fe-ours"), OURS["kv"])
    engine = st.engine_metric(ENGINE["kv"])
    time.sleep(2.5)  # past the next keepalive Pong
    after = metric_value(st.metrics("fe-ours"), OURS["kv"])
    return (before, engine, after) if st.engine_load().num_waiting == waiting > 0 else None


def test_load_and_kv_use_follow_the_engine(gw):
    model = httpx.get(f"{gw.base}/v1/models").json()["data"][0]["id"]
    stop, errors = threading.Event(), []
    threads = [threading.Thread(target=_stream, args=(gw, model, stop, errors)) for _ in range(QUEUED)]
    for t in threads:
        t.start()
    try:
        for fid in FRONTENDS:  # one request runs (--max-num-seqs 1), the others wait
            _wait(lambda f=fid: _same_as_engine(gw, f), 30, f"{fid} never showed the engine's load")
        theirs = gw.metrics("fe-vllm")
        assert _load(theirs, VLLM)[:2] == _load(theirs, OURS)[:2] and _load(theirs, VLLM)[1] == 1
        blocks = int(metric_labels(gw.metrics("fe-ours"), OURS["cache"])["num_gpu_blocks"])
        seen = next(filter(None, (_kv_between(gw) for _ in range(QUEUED))), None)
        assert seen is not None, "the queue moved during every KV check"
        before, engine, after = seen
        assert 0 < before <= engine <= after <= 1, seen
        assert abs(after * blocks - round(after * blocks)) < 1e-6  # a whole number of blocks
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    # Every request aborted: the engine frees every block, and each frontend reports it.
    gw.wait_engine_idle(20)
    for fid in FRONTENDS:
        _wait(lambda f=fid: _load(gw.metrics(f), OURS) == (0, 0, 0), 10, f"{fid} never returned to idle")
    assert gw.engine_metric(ENGINE["kv"]) == 0
    assert httpx.get(f"{gw.base}/health").status_code == 200
