"""A short soak of the real stack: rounds of mixed traffic (streams, n > 1, chat, clients that
walk away mid-stream, bad requests) from concurrent clients. Afterwards every good request has
succeeded, the engine holds nothing, every KV block is back in the pool, the services still
answer, and their memory has stopped growing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from e2e_stack import Stack
from frontend_helpers import metric_value, wait_until

ROUNDS = 8
CLIENTS = 6
RSS_GROWTH_LIMIT = 48 << 20  # bytes a service may grow by between the first and last round


def _complete(base: str, i: int) -> str:
    body = {"prompt": f"soak {i} counts one two", "max_tokens": 8, "temperature": 0.8, "seed": i, "n": 2}
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert len(choices) == 2 and all(c["finish_reason"] in ("stop", "length") for c in choices)
    return "complete"


def _chat_stream(base: str, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 12
    return "stream"


def _walk_away(base: str, i: int) -> str:
    """A client that reads two chunks of a long stream and closes the connection."""
    body = {"prompt": f"walk away {i}", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for n, _ in enumerate(resp.iter_lines()):
            if n >= 2:
                break
    return "walked"


def _bad(base: str, i: int) -> str:
    bodies = [{"prompt": "x", "temperature": -1}, {"prompt": [], "max_tokens": 2}, {"prompt": "x", "n": 0}]
    resp = httpx.post(f"{base}/v1/completions", json=bodies[i % len(bodies)], timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    return "bad"


WORKLOAD = [_complete, _chat_stream, _walk_away, _bad, _complete, _chat_stream]


def _rss(pids: list[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


@pytest.fixture(scope="module")
def soak_stack(make_stack) -> Stack:
    st = make_stack()
    st.start_worker()
    st.start_engine()
    proc = st.start_frontend("fe-soak")
    wait_until(f"{st.base}/health", proc, timeout=120)
    return st


def test_soak_mixed_traffic_leaks_nothing(soak_stack: Stack) -> None:
    st = soak_stack
    assert st.engine is not None
    pids = [st.engine.popen.pid, st.procs[-1].popen.pid]  # the engine and the frontend
    done: list[str] = []
    first_rss: dict[int, int] = {}
    with ThreadPoolExecutor(CLIENTS) as pool:
        for r in range(ROUNDS):
            jobs = [pool.submit(fn, st.base, r * CLIENTS + c) for c, fn in enumerate(WORKLOAD)]
            done += [job.result() for job in jobs]  # re-raises a client's assertion
            st.wait_engine_idle(timeout=60)
            if r == 1:  # after a warm-up round: imports, caches and pools are in place
                first_rss = _rss(pids)
    assert len(done) == ROUNDS * len(WORKLOAD)
    assert st.engine_metric("pagedserve_engine_kv_cache_usage_ratio") == 0.0
    assert st.engine_metric("pagedserve_engine_requests_running") == 0
    assert metric_value(st.metrics("fe-soak"), "pagedserve_frontend_requests_in_flight") == 0
    assert httpx.get(f"{st.base}/health", timeout=30).status_code == 200
    growth = {pid: rss - first_rss[pid] for pid, rss in _rss(pids).items()}
    assert max(growth.values()) < RSS_GROWTH_LIMIT, growth
