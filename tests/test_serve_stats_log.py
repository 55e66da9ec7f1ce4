"""vLLM's periodic stats lines and startup timings. Over the real engine core and model runner, the counts behind
the throughputs are exact (every computed prompt token once, chunked prefill and prefix hits
included; every sampled token); through `pagedserve serve` the engine prints the lines while it
works, and none with --disable-log-stats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from pagedserve import LLM
from pagedserve.serve import free_port
from services.engine.stats_log import StatsLogger
from shared.sampling_params import SamplingParams

LINE = re.compile(
    r"Engine 000: Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
    r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: ([\d.]+)%, Prefix cache hit rate: ([\d.]+)%"
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def llm(model_dirs):
    # a small token budget: prompts arrive in several chunks
    return LLM(str(model_dirs("llama")), max_model_len=256, max_num_batched_tokens=24, block_size=16)


def test_counts_are_exact_over_the_real_core(llm):
    core, clock = llm.engine, Clock()
    stats = StatsLogger(10.0, clock)
    prompts = [list(range(start, start + n)) for start, n in ((5, 40), (60, 7), (100, 33))]
    prompts.append(prompts[0][:32] + [99, 98])  # shares two full blocks with the first
    max_tokens = [5, 9, 1, 4]
    for batch in ((0, 1, 2), (3,)):  # the fourth once the first's blocks are cached
        for i in batch:
            params = SamplingParams(max_tokens=max_tokens[i], ignore_eos=True)
            core.add_request(core.make_request(f"r{i}", prompts[i], params))
        while core.has_unfinished():
            stats.record(core.step(), core.last_num_tokens)
    clock.now = 10.0
    line = stats.maybe_log(core.scheduler)
    prompt_tps, gen_tps, running, waiting, kv, hit = map(float, LINE.fullmatch(line).groups())
    cached = 32  # the fourth prompt's two shared blocks are not computed again
    assert prompt_tps * 10 == pytest.approx(sum(map(len, prompts)) - cached)
    assert gen_tps * 10 == pytest.approx(sum(max_tokens))
    assert (running, waiting, kv) == (0, 0, 0.0)
    assert hit > 0
    clock.now = 15.0
    assert stats.maybe_log(core.scheduler) is None  # not before the interval
    clock.now = 20.0
    idle = stats.maybe_log(core.scheduler)  # logged at DEBUG: nothing happened
    assert LINE.fullmatch(idle).groups()[:2] == ("0.0", "0.0")


def _serve(model: str, port: int, log, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", model, "--port", str(port), "--max-model-len", "128",
           "--engine-metrics-port", str(free_port()), "--worker-metrics-port", str(free_port()),
           "--frontend-metrics-port", "0", "--ready-timeout", "180", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="INFO"))


def _generate(port: int, model: str, count: int) -> None:
    body = json.dumps({"model": model, "prompt": "hello there", "max_tokens": 24, "ignore_eos": True}).encode()
    for _ in range(count):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200


@pytest.mark.parametrize("disabled", [False, True])
def test_serve_prints_stats_lines(model_dirs, tmp_path, disabled):
    model, port, path = str(model_dirs("llama")), free_port(), tmp_path / "serve.log"
    extra = ["--log-stats-interval", "0.5"] + (["--disable-log-stats"] if disabled else [])
    with open(path, "w") as log:
        proc = _serve(model, port, log, *extra)
    try:
        deadline = time.monotonic() + 200
        while "pagedserve: serving" not in path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, path.read_text()[-3000:]
            time.sleep(0.5)
        _generate(port, model, 6)

        def logged() -> list[tuple[str, ...]]:
            return [m.groups() for m in map(LINE.search, path.read_text().splitlines()) if m]

        deadline = time.monotonic() + (1.5 if disabled else 15)  # three intervals; a loaded machine may log later
        while (disabled or not any(float(gen) > 0 for _, gen, *_ in logged())) and time.monotonic() < deadline:
            time.sleep(0.25)
        lines = logged()
        if disabled:
            assert lines == []
        else:
            assert any(float(gen) > 0 for _, gen, *_ in lines), path.read_text()[-3000:]
            assert any(float(prompt) > 0 for prompt, *_ in lines)
        text = path.read_text()  # the worker's startup: a bar over the weight files, each phase's time
        assert "Loading safetensors checkpoint shards: 100%" in text
        assert re.search(r"loading the model weights took \d+\.\d\d s", text)
        assert re.search(r"sizing and allocating the KV cache took \d+\.\d\d s", text)
        assert "capturing CUDA graphs" not in text  # nothing captured on CPU
    finally:
        proc.terminate()
        proc.wait(60)
