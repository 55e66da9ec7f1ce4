"""Speculative decoding with --async-scheduling through the engine and worker processes (suffix
decoding, whose trees then live on the worker): greedy output, stop ids and max_tokens equal the
offline non-speculative run, proposals are counted on the engine's /metrics, an abort mid-stream
and finished requests free every block, and a request whose worker is killed mid-run resumes on
a new worker with the same tokens, as does one whose engine is killed mid-run and resubmitted
(as a frontend does) to a new engine the worker re-joins."""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest
from service_helpers import scrape, scrape_until
from spec_service import GREEDY, PROMPTS, module_fixtures
from test_engine_service import Client, engine_stack
from test_spec_decode_service import (  # noqa: F401 -- the same test, on this module's stack
    test_a_killed_worker_is_replaced_and_the_request_resumes_token_for_token,
)

from shared.protocol import AbortRequests, AddRequest, Outputs, Ping
from shared.sampling_params import SamplingParams

FLAGS = ("--speculative-config", json.dumps({"method": "suffix", "num_speculative_tokens": 4}), "--async-scheduling")
model, expected = module_fixtures()


@pytest.fixture(scope="module")
def stack(model):
    with engine_stack(model, *FLAGS, "--worker-timeout", "2", worker_flags=FLAGS) as started:
        yield started


def send(client: Client, req_id: str, prompt: list[int], params: SamplingParams) -> None:
    client.tx.send(AddRequest(req_id, np.array(prompt, dtype=np.int32), params))


def test_served_output_equals_non_speculative_and_every_block_returns(stack, expected):
    _, inp, out, _procs, ports = stack
    stop_id = expected[1][30]  # a stop id the output reaches mid-way: it must stop exactly there
    stopping = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop_token_ids=[stop_id])
    short = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    with Client(inp, out) as client, Client(inp, out) as other:
        client.hello()
        other.hello()
        send(other, "aborted", PROMPTS[2], long)  # still running when the others finish
        ids = [f"{client.id}-{i}" for i in range(len(PROMPTS))]
        for rid, p in zip(ids, PROMPTS):
            send(client, rid, p, GREEDY)
        send(client, "stop", PROMPTS[1], stopping)
        send(client, "short", PROMPTS[1], short)
        got = client.collect({*ids, "stop", "short"}, timeout_s=120)
        other.tx.send(AbortRequests(["aborted"]))
        running = None
        for _ in range(60):
            client.beat()
            other.beat()
            client.tx.send(Ping(7))
            msg = client.rx.recv(timeout_ms=1000)
            if getattr(msg, "ping_id", None) == 7 and (running := msg.num_running) == 0:
                break
        aborted = other.collect({"aborted"}, timeout_s=10)["aborted"]
    assert aborted[0] == "abort" and 0 < len(aborted[1]) < 100  # it was running when aborted
    assert running == 0
    for rid, tokens in zip(ids, expected):
        assert got[rid] == ("length", tokens)
    assert got["stop"] == ("stop", expected[1][: expected[1].index(stop_id) + 1])
    assert got["short"] == ("length", expected[1][:7])
    engine = scrape_until(ports[0], lambda m: m["pagedserve_engine_kv_cache_usage_ratio"] == 0.0)
    proposed = engine["pagedserve_engine_spec_decode_num_draft_tokens_total"]
    accepted = engine["pagedserve_engine_spec_decode_num_accepted_tokens_total"]
    assert 0 < engine["pagedserve_engine_spec_decode_num_drafts_total"] <= proposed and 0 < accepted < proposed
    assert engine["pagedserve_engine_kv_cache_usage_ratio"] == 0.0  # every block back


def test_a_restarted_engine_continues_a_resubmitted_request_token_for_token(stack, expected):
    """The frontend's part (tests/test_recovery.py) is played here: the tokens received before
    the engine died go back with the request, and the new engine continues after them."""
    _, inp, out, procs, ports = stack
    tokens: list[int] = []
    with Client(inp, out) as client:
        client.hello()
        send(client, "interrupted", PROMPTS[1], GREEDY)
        deadline = time.monotonic() + 120
        while len(tokens) < 10 and time.monotonic() < deadline:
            client.beat()
            msg = client.rx.recv(timeout_ms=1000)
            tokens += [t for d in (msg.deltas if isinstance(msg, Outputs) else []) for t in d.new_token_ids]
        assert 10 <= len(tokens) < 60  # mid-run: a new engine takes over
        procs[0].kill()
        procs[0].wait(10)
        procs[0] = subprocess.Popen(procs[0].args, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
        client.hello()  # the new engine, once the worker has joined it
        client.tx.send(AddRequest("resubmitted", np.array(PROMPTS[1], dtype=np.int32), GREEDY,
                                  output_token_ids=np.array(tokens, dtype=np.int32)))
        finish, rest = client.collect({"resubmitted"}, timeout_s=180)["resubmitted"]
    assert finish == "length"
    assert tokens + rest == expected[1]
    assert scrape(ports[0])["pagedserve_engine_spec_decode_num_accepted_tokens_total"] > 0  # the new engine speculated
