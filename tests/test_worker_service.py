"""A real worker process keeps serving through requests whose grammar or sampling goes wrong:
each ends alone (stopped by its grammar, or failed with its reason), the request beside them
gets the tokens it gets alone, and every block goes back to the pool."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import scrape
from test_engine_service import Client, engine_stack

from shared.protocol import AddRequest, Ping
from shared.sampling_params import SamplingParams, StructuredOutputsParams

S = StructuredOutputsParams
BESIDE = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(model_dirs):
    with engine_stack(str(model_dirs("llama"))) as started:
        yield started


def test_per_request_errors_in_a_worker_process_stay_with_their_request(stack):
    inp, out, procs, ports = stack[1], stack[2], stack[-2], stack[-1]
    client = Client(inp, out)
    client.hello()
    prompt = np.array([21, 22, 23], np.int32)
    client.tx.send(AddRequest("alone", prompt, BESIDE))
    alone = client.collect({"alone"})["alone"]
    short = np.array([11, 12], np.int32)
    requests = [
        # the reproducer: the grammar completes long before max_tokens, EOS ignored
        AddRequest("regex", short, SamplingParams(max_tokens=5, ignore_eos=True, structured_outputs=S(regex="a"))),
        AddRequest("choice", short, SamplingParams(max_tokens=5, min_tokens=4, structured_outputs=S(choice=["a"]))),
        AddRequest("inf-penalty", short, SamplingParams(repetition_penalty=1e-45)),
        AddRequest("bad-schema", short, SamplingParams(structured_outputs=S(json={"type": "x"}))),
        AddRequest("beside", prompt, BESIDE),
    ]
    for request in requests:
        client.tx.send(request)
    got = client.collect({r.req_id for r in requests})
    assert got["beside"] == alone and alone[0] == "length" and len(alone[1]) == 8
    for req_id in ("regex", "choice"):
        assert got[req_id][0] == "stop" and len(got[req_id][1]) == 2, got[req_id]  # "a", then the stop
    assert got["inf-penalty"][0].startswith("error") and got["bad-schema"][0].startswith("error")
    client.tx.send(Ping(7))
    pong = client.rx.recv(timeout_ms=10_000)
    assert (pong.ping_id, pong.num_running, pong.num_waiting) == (7, 0, 0)
    assert scrape(ports[0])["pagedserve_engine_kv_cache_usage_ratio"] == 0.0
    assert scrape(ports[1])["pagedserve_worker_failed_requests_total"] == 2  # inf-penalty, bad-schema
    assert all(p.poll() is None for p in procs)
    client.tx.send(AddRequest("after", prompt, BESIDE))
    assert client.collect({"after"})["after"] == alone
    client.close()
