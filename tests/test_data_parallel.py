"""Data-parallel replicas behind one frontend, as real processes: two engines, each with its
worker, and a frontend given both (what `serve --data-parallel-size 2` starts; the launch itself
is checked in test_serve.py).

Requests sharing a prefix land on the replica holding it (each engine's prefix-cache hits say
so); greedy output is the offline (one engine) output; the frontend's /metrics sum the replicas
and show each; and when a replica's engine dies, new requests go to the other one while the
request it was running resumes, with the same text, once that engine is back."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import scrape, sse_events
from test_recovery import spawn, wait_healthy

from pagedserve.serve import free_port

MAX_MODEL_LEN = 1024  # the tiny model's longest
PREFIX_BLOCKS = 3  # of 16 tokens


class DPStack:
    def __init__(self, model: str):
        self.model = model
        self.engine_ports = [free_port(), free_port()]
        self.worker_ports = [free_port(), free_port()]
        self.frontend_metrics = free_port()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        addrs = [[f"tcp://127.0.0.1:{free_port()}" for _ in range(3)] for _ in range(2)]
        common = ["--model", model, "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny",
                  "--kv-cache-memory", str(16 << 20)]
        self.engines = [["engine", *common, "--frontend-input", inp, "--frontend-output", out, "--worker-addr", wrk,
                         "--metrics-port", str(port)] for (inp, out, wrk), port in zip(addrs, self.engine_ports)]
        self.procs = [spawn("worker", *common, "--worker-addr", wrk, "--metrics-port", str(port))
                      for (_, _, wrk), port in zip(addrs, self.worker_ports)]
        self.engine_procs = [spawn(*cmd) for cmd in self.engines]
        self.procs.append(spawn("frontend", "--engine-input", *(a[0] for a in addrs), "--engine-output",
                                *(a[1] for a in addrs), "--port", str(self.port), "--metrics-port",
                                str(self.frontend_metrics), "--stall-timeout", "1", "--resume-timeout", "120"))

    def restart_engine(self, replica: int) -> None:
        self.engine_procs[replica] = spawn(*self.engines[replica])

    def engine(self, replica: int) -> dict[str, float]:
        return scrape(self.engine_ports[replica])

    def frontend(self, name: str) -> dict[tuple[str, ...], float]:
        """A frontend series' values by their labels other than model_name."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.frontend_metrics}/metrics", timeout=5).read().decode()
        return {tuple(v for k, v in sorted(s.labels.items()) if k != "model_name"): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name}

    def wait_up(self, expected: dict[tuple[str, ...], float], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.frontend("pagedserve_frontend_replica_up") != expected:
            assert time.monotonic() < deadline, self.frontend("pagedserve_frontend_replica_up")
            time.sleep(0.2)

    def close(self) -> None:
        for p in self.procs + self.engine_procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def stack(model_dirs) -> Iterator[DPStack]:
    s = DPStack(str(model_dirs("llama")))
    try:
        wait_healthy(s.base, 180)
        s.wait_up({("0",): 1.0, ("1",): 1.0})
        yield s
    finally:
        s.close()


def complete(base: str, prompt: list[int] | str, max_tokens: int = 2) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=180))


def stream(base: str, prompt: list[int], max_tokens: int, started: threading.Event) -> tuple[str, str]:
    """A streamed greedy completion: (text, finish reason)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    events = sse_events(base + "/v1/completions", body, started)
    assert events[-1] == "[DONE]", events[-3:]
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    return "".join(c["text"] for c in choices), next(c["finish_reason"] for c in reversed(choices) if c["finish_reason"])


def prefixed(group: int, user: int) -> list[int]:
    """A prompt of group ``group``'s shared prefix (whole blocks) and a user's own two tokens."""
    return [100 + 60 * group + i for i in range(PREFIX_BLOCKS * 16)] + [20 + user, 30 + user]


def test_requests_sharing_a_prefix_land_on_one_replica(stack):
    before = [stack.engine(i) for i in range(2)]
    groups, users = 4, 3
    for user in range(users):
        for group in range(groups):
            complete(stack.base, prefixed(group, user))
    after = [stack.engine(i) for i in range(2)]
    hits = [a["pagedserve_engine_prefix_cache_hit_tokens_total"] - b["pagedserve_engine_prefix_cache_hit_tokens_total"]
            for a, b in zip(after, before)]
    served = [a["pagedserve_engine_request_queue_time_seconds_count"]
              - b["pagedserve_engine_request_queue_time_seconds_count"] for a, b in zip(after, before)]
    # every request after its group's first found the whole prefix cached: it went where the first did
    assert sum(hits) == groups * (users - 1) * PREFIX_BLOCKS * 16
    # the groups were spread over both replicas, each group whole on one
    assert sum(served) == groups * users and all(n > 0 and n % users == 0 for n in served), served
    routed = stack.frontend("pagedserve_frontend_replica_routed_requests_total")
    assert sum(v for (reason, _), v in routed.items() if reason == "affinity") == groups * (users - 1)
    assert sum(v for (reason, _), v in routed.items() if reason == "load") >= groups


def test_greedy_output_equals_one_engine(stack, model_dirs):
    from pagedserve import LLM, SamplingParams

    prompts = ["Hello, my name is", "The capital of France", "1 2 3 4", "Once upon a time", "def f(x):", "zz"]
    with ThreadPoolExecutor(len(prompts)) as pool:  # side by side, over both replicas
        served = list(pool.map(lambda p: complete(stack.base, p, 12)["choices"][0]["text"], prompts))
    llm = LLM(str(model_dirs("llama")), max_model_len=MAX_MODEL_LEN, kv_cache_memory=16 << 20)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert served == [o.outputs[0].text for o in offline]


def test_metrics_sum_the_replicas_and_show_each(stack):
    ((block_size, blocks),) = stack.frontend("pagedserve_frontend_cache_config_info")  # one series for both
    workers = [scrape(port)["pagedserve_worker_kv_blocks"] for port in stack.worker_ports]
    assert block_size == "16" and int(blocks) == sum(workers) and workers[0] > 0
    assert set(stack.frontend("pagedserve_frontend_replica_kv_cache_usage_ratio")) == {("0",), ("1",)}


def test_a_dead_replica_gets_no_new_requests_and_its_request_resumes(stack):
    prompt, tokens = prefixed(9, 0), MAX_MODEL_LEN - 60
    expected = complete(stack.base, prompt, tokens)["choices"][0]["text"]  # undisturbed
    def summed_running() -> bool:
        return stack.frontend("pagedserve_frontend_engine_requests_running") == {(): 1.0}

    with ThreadPoolExecutor(1) as pool:
        for _ in range(5):  # on a fast machine the request can finish before the frontend's next ping: again
            streamed = pool.submit(stream, stack.base, prompt, tokens, started := threading.Event())
            assert started.wait(60)
            running = [stack.engine(i)["pagedserve_engine_requests_running"] for i in range(2)]
            home = running.index(1.0) if 1.0 in running else None
            while home is not None and not summed_running() and not streamed.done():
                time.sleep(0.05)
            if home is not None and not streamed.done():
                stack.engine_procs[home].kill()  # the request in flight there
                break
            streamed.result(timeout=60)
        else:
            pytest.fail("every request finished before the frontend saw it running")
        assert stack.frontend("pagedserve_frontend_replica_requests_running")[(str(home),)] == 1
        stack.engine_procs[home].wait(10)
        stack.wait_up({(str(home),): 0.0, (str(1 - home),): 1.0})
        assert urllib.request.urlopen(stack.base + "/health", timeout=10).status == 200  # the other answers
        before = stack.engine(1 - home)["pagedserve_engine_request_queue_time_seconds_count"]
        routed = stack.frontend("pagedserve_frontend_replica_routed_requests_total")
        for user in range(1, 4):  # the dead replica's own prefix too
            assert complete(stack.base, prefixed(9, user))["choices"][0]["finish_reason"] == "length"
        after = stack.engine(1 - home)["pagedserve_engine_request_queue_time_seconds_count"]
        assert after - before == 3
        assert _sent_to(stack.frontend("pagedserve_frontend_replica_routed_requests_total"), home) == \
            _sent_to(routed, home)
        assert not streamed.done()
        stack.restart_engine(home)
        text, reason = streamed.result(timeout=180)
    assert (text, reason) == (expected, "length")
    stack.wait_up({("0",): 1.0, ("1",): 1.0})


def _sent_to(routed: dict[tuple[str, ...], float], replica: int) -> float:
    return sum(v for (_, r), v in routed.items() if r == str(replica))


def _wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)
