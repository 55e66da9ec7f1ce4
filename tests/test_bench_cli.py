"""`pagedserve bench`: serve against the real stack (vLLM's result keys, sane values, a PNG plot),
the offline throughput and latency commands, and the datasets."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve import start_serve, wait_line

from pagedserve.bench.datasets import add_dataset_args, load_requests
from pagedserve.bench.metrics import percentile
from pagedserve.bench.serve import arrival_gaps
from pagedserve.serve import free_port

ENV = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pagedserve.cli", "bench", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def dataset_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_dataset_args(p)
    return p.parse_args(list(argv))


def test_bench_serve_reports_vllm_keys_and_plots(model_dirs, tmp_path: Path):
    model = str(model_dirs("llama"))
    port = free_port()
    serve = start_serve(model, port)
    try:
        wait_line(serve, "serving")
        out = bench(
            "serve", "--port", str(port), "--tokenizer", model, "--num-prompts", "6", "--random-input-len", "20",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--max-concurrency", "3", "--ignore-eos",
            "--request-rate", "20", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "r.json", "--metric-percentiles", "50,99", "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--plot", str(tmp_path / "plot.png"),
        )
    finally:
        serve.terminate()
        serve.wait(60)
    assert "Serving Benchmark Result" in out.stdout and "P99 TTFT (ms):" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    expected = load_requests(dataset_args("--num-prompts", "6", "--random-input-len", "20", "--random-output-len", "6",
                                          "--random-range-ratio", "0.5"), result_vocab(model))
    assert result["completed"] == 6 and result["failed"] == 0 and not any(result["errors"])
    assert result["input_lens"] == [r.prompt_len for r in expected]  # the server's usage, exact
    assert result["output_lens"] == [r.output_len for r in expected]  # ignore_eos: each ran to max_tokens
    assert result["total_output_tokens"] == sum(r.output_len for r in expected)
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration"])
    assert 1 <= result["max_concurrent_requests"] <= 3 and result["max_concurrency"] == 3
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{name}_ms"] <= result[f"p99_{name}_ms"]
        assert result[f"p50_{name}_ms"] == pytest.approx(result[f"median_{name}_ms"])
    assert all(t > 0 for t in result["ttfts"]) and len(result["itls"]) == 6
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def result_vocab(model: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model))


def test_bench_serve_fails_clearly_without_a_server_or_dataset():
    for extra, message in ((["--dataset-path", "/nonexistent.json", "--model", "m"], "/nonexistent.json: no such file"),
                           ([], "cannot reach http://127.0.0.1:")):
        cmd = [sys.executable, "-m", "pagedserve.cli", "bench", "serve", "--port", str(free_port()),
               "--dataset-name", "sharegpt", "--disable-tqdm", *extra]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=ENV)
        assert proc.returncode == 2 and f"pagedserve: error: {message}" in proc.stderr, proc.stderr[-2000:]


def test_bench_throughput_and_latency_offline(model_dirs, tmp_path: Path):
    model = str(model_dirs("llama"))
    common = ("--model", model, "--max-model-len", "128", "--kv-cache-memory", str(8 << 20), "--disable-tqdm")
    bench("throughput", *common, "--num-prompts", "5", "--random-input-len", "12", "--random-output-len", "4",
          "--output-json", str(tmp_path / "t.json"))
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["num_requests"] == 5 and t["total_output_tokens"] == 20 and t["total_num_tokens"] == 5 * 12 + 20
    assert t["tokens_per_second"] == pytest.approx(t["total_num_tokens"] / t["elapsed_time"])
    out = bench("latency", *common, "--input-len", "8", "--output-len", "3", "--batch-size", "2",
                "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(tmp_path / "l.json"))
    lat = json.loads((tmp_path / "l.json").read_text())
    assert len(lat["latencies"]) == 3 and lat["avg_latency"] > 0 and "Avg latency:" in out.stdout
    assert lat["percentiles"]["10"] <= lat["percentiles"]["50"] <= lat["percentiles"]["99"]


def test_datasets_lengths_prefixes_and_sharegpt(tmp_path: Path, model_dirs):
    reqs = load_requests(dataset_args("--num-prompts", "50", "--random-input-len", "100", "--random-output-len",
                                      "10", "--random-range-ratio", "0.5", "--random-prefix-len", "7"), 1000)
    assert all(57 <= r.prompt_len <= 157 and len(r.prompt) == r.prompt_len and 5 <= r.output_len <= 15 for r in reqs)
    assert len({tuple(r.prompt[:7]) for r in reqs}) == 1 and all(10 <= t < 1000 for r in reqs for t in r.prompt)
    shared = load_requests(dataset_args("--dataset-name", "prefix_repetition", "--num-prompts", "12",
                                        "--prefix-repetition-prefix-len", "30", "--prefix-repetition-suffix-len", "5",
                                        "--prefix-repetition-num-prefixes", "3"), 1000)
    assert len({tuple(r.prompt[:30]) for r in shared}) == 3 and len({tuple(r.prompt) for r in shared}) == 12
    assert all(r.prompt_len == 35 and r.output_len == 128 for r in shared)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dirs("llama")))
    convs = [{"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi, how are you"}]},
             {"conversations": [{"from": "human", "value": "only one turn"}]}, "junk"]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    sg = load_requests(dataset_args("--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "sg.json")), 0, tok)
    assert [(r.prompt, r.output_len) for r in sg] == [("hello there", len(tok.encode("hi, how are you")))]
    with pytest.raises(ValueError, match="needs --dataset-path"):
        load_requests(dataset_args("--dataset-name", "sharegpt"), 0, tok)
    with pytest.raises(ValueError, match="range-ratio"):
        load_requests(dataset_args("--random-range-ratio", "1.5"), 1000)


def test_arrivals_and_percentiles():
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps(4000, 10.0, 1.0, 0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)  # mean gap 1/rate
    with pytest.raises(ValueError):
        arrival_gaps(3, 0.0, 1.0, 0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
