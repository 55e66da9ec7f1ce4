"""Speculative decoding through the engine and worker processes: greedy output equals the offline
non-speculative run, the engine exports vLLM's spec_decode counters, and a request whose worker
is killed mid-run resumes on a new worker with the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest
from service_helpers import scrape
from spec_service import GREEDY, PROMPTS, module_fixtures
from test_engine_service import Client, engine_stack

from shared.protocol import AddRequest, Outputs

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
model, expected = module_fixtures()


@pytest.fixture(scope="module")
def stack(model):
    # the engine proposes (synchronous scheduling; test_spec_decode_async_service.py: the workers)
    with engine_stack(model, "--speculative-config", SPEC, "--no-async-scheduling", "--worker-timeout", "2",
                      worker_flags=("--no-async-scheduling",)) as started:
        yield started


def test_served_greedy_output_equals_non_speculative_and_is_counted(stack, expected):
    _, inp, out, _procs, ports = stack
    with Client(inp, out) as client:
        client.hello()
        for i, p in enumerate(PROMPTS):
            client.tx.send(AddRequest(f"{client.id}-{i}", np.array(p, dtype=np.int32), GREEDY))
        got = client.collect({f"{client.id}-{i}" for i in range(len(PROMPTS))})
    for i, tokens in enumerate(expected):
        assert got[f"{client.id}-{i}"] == ("length", tokens)
    engine = scrape(ports[0])  # one series per name, except per position (the last one read)
    drafts = engine["pagedserve_engine_spec_decode_num_drafts_total"]
    proposed = engine["pagedserve_engine_spec_decode_num_draft_tokens_total"]
    accepted = engine["pagedserve_engine_spec_decode_num_accepted_tokens_total"]
    assert 0 < drafts <= proposed and 0 < accepted < proposed
    assert engine["pagedserve_engine_kv_cache_usage_ratio"] == 0.0  # every block back


def test_a_killed_worker_is_replaced_and_the_request_resumes_token_for_token(stack, expected):
    _, inp, out, procs, _ = stack
    req_id, tokens, finish, replaced = "resumed", [], None, False
    with Client(inp, out) as client:
        client.hello()
        client.tx.send(AddRequest(req_id, np.array(PROMPTS[1], dtype=np.int32), GREEDY))
        deadline = time.monotonic() + 180
        while finish is None and time.monotonic() < deadline:
            client.beat()
            msg = client.rx.recv(timeout_ms=1000)
            for d in msg.deltas if isinstance(msg, Outputs) else []:
                tokens += d.new_token_ids
                finish = d.finish_reason
            if 10 <= len(tokens) < 60 and not replaced:  # mid-run: a new worker process takes over
                procs[1].kill()
                procs[1].wait(10)
                procs[1] = subprocess.Popen(procs[1].args, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
                replaced = True
    assert replaced and finish == "length"
    assert tokens == expected[1]
