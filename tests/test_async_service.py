"""Async scheduling in the engine process, over real sockets with a real worker: the tokens of the
offline (synchronous) engine, exact max_tokens and stop ids, aborts mid-stream that free every
block, and the per-step timeline on the engine's /metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest
from service_helpers import scrape, scrape_until
from test_engine_service import Client, engine_stack

from shared.protocol import AbortRequests, AddRequest, Outputs, Ping
from shared.sampling_params import SamplingParams

TIMELINE = ("plan", "worker_compute", "worker_idle", "transport")


@pytest.fixture(scope="module")
def async_stack(model_dirs):
    with engine_stack(str(model_dirs("llama")), "--async-scheduling", "--frontend-timeout", "3") as started:
        yield started


def test_async_engine_gives_the_offline_tokens(async_stack):
    from pagedserve import LLM

    model, inp, out, _procs, ports = async_stack
    prompts = [[11, 12, 13], list(range(20, 60)), [99] * 17, [7, 8]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model, max_model_len=128, kv_cache_memory=8 << 20)
    expected = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    # a stop id: the fifth greedy token of the first prompt, so it must stop exactly there
    stop_id = expected[0].outputs[0].token_ids[4]
    stopping = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    with Client(inp, out) as client:
        client.hello()
        for i, p in enumerate(prompts):
            client.tx.send(AddRequest(f"{client.id}-{i}", np.array(p, dtype=np.int32), greedy))
        client.tx.send(AddRequest(f"{client.id}-stop", np.array(prompts[0], dtype=np.int32), stopping))
        got = client.collect({f"{client.id}-{i}" for i in range(len(prompts))} | {f"{client.id}-stop"})
    for i, exp in enumerate(expected):
        assert got[f"{client.id}-{i}"] == ("length", exp.outputs[0].token_ids)
    first = expected[0].outputs[0].token_ids
    assert got[f"{client.id}-stop"] == ("stop", first[: first.index(stop_id) + 1])
    engine = scrape(ports[0])
    for part in TIMELINE:
        assert engine[f"pagedserve_engine_step_{part}_seconds_count"] > 0, part
    # the worker computed (not idled) most of a step's time once requests were flowing
    assert engine["pagedserve_engine_step_worker_compute_seconds_sum"] > 0


def test_an_abort_mid_stream_frees_every_block(async_stack):
    _model, inp, out, _procs, ports = async_stack
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    with Client(inp, out) as client:
        client.hello()
        ids = [f"{client.id}-{i}" for i in range(3)]
        for i, rid in enumerate(ids):
            client.tx.send(AddRequest(rid, np.array([5 + i] * (20 + i), dtype=np.int32), long))
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while min(seen.get(r, 0) for r in ids) < 3 and time.monotonic() < deadline:
            client.beat()
            msg = client.rx.recv(timeout_ms=1000)
            if isinstance(msg, Outputs):
                for d in msg.deltas:
                    seen[d.req_id] = seen.get(d.req_id, 0) + len(d.new_token_ids)
        assert min(seen.get(r, 0) for r in ids) >= 3  # every stream is flowing
        client.tx.send(AbortRequests(ids))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client.beat()
            client.tx.send(Ping(7))
            msg = client.rx.recv(timeout_ms=1000)
            if getattr(msg, "ping_id", None) == 7 and msg.num_running == 0:
                break
        engine = scrape_until(ports[0], lambda m: m["pagedserve_engine_kv_cache_usage_ratio"] == 0
                              and m["pagedserve_engine_requests_running"] == 0)
    assert engine["pagedserve_engine_kv_cache_usage_ratio"] == 0
    assert engine["pagedserve_engine_requests_running"] == 0
