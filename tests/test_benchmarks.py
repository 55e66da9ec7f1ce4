"""Smoke test: benchmarks/throughput.py runs end to end on a tiny checkpoint and reports sane counts.

Speed itself is never asserted here (see benchmarks/); only that the script works and counts right.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pagedserve.test_model import make_test_model

    return Path(make_test_model(tmp_path_factory.mktemp("bench"), "llama", "tiny"))


def _run_benchmark(model: Path, *extra: str) -> tuple[dict, str]:
    cmd = [sys.executable, str(SCRIPT), "--model", str(model), "--num-prompts", "4"]
    cmd += ["--input-len", "8", "16", "--output-len", "4", "8", "--hf-prompts", "2", "--hf-batch-size", "2"]
    cmd += ["--gemm-size", "128", "--gemm-reps", "2", "--threads", "1", *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith('{"benchmark": "throughput"'), proc.stdout
    return json.loads(last), proc.stdout


def test_throughput_script_reports_consistent_counts(tiny_llama: Path) -> None:
    info, stdout = _run_benchmark(tiny_llama)
    ours, hf = info["pagedserve"], info["hf"]
    assert "pagedserve / transformers" in stdout  # the readable table came first
    assert info["params"] > 0 and info["gemm_peak_gflops"] > 0
    assert ours["prompts"] == 4 and hf["prompts"] == 2
    # ignore_eos and max_tokens = requested length: every request yields exactly what it asked for
    assert ours["generated_tokens"] == info["pagedserve"]["requested_output_tokens"]
    assert 4 * 4 <= ours["generated_tokens"] <= 4 * 8
    assert 4 * 8 <= ours["prompt_tokens"] <= 4 * 16
    assert ours["total_tokens"] == ours["prompt_tokens"] + ours["generated_tokens"]
    assert hf["generated_tokens"] == hf["requested_output_tokens"] and 2 * 8 <= hf["prompt_tokens"] <= 2 * 16
    for run in (ours, hf):
        assert run["elapsed_s"] > 0 and run["generated_tok_s"] > 0 and run["mfu"] > 0
    assert info["ratio"] == pytest.approx(ours["generated_tok_s"] / hf["generated_tok_s"], rel=1e-3)
    assert 0 <= info["hf_matching_outputs"] <= 2
    assert info["settings"]["num_prompts"] == 4 and info["settings"]["dtype"] == "float32"


def test_throughput_script_skip_hf(tiny_llama: Path) -> None:
    info, _ = _run_benchmark(tiny_llama, "--skip-hf", "--num-prompts", "3")
    assert info["hf"] is None and info["ratio"] is None
    assert info["pagedserve"]["prompts"] == 3
    assert info["pagedserve"]["generated_tokens"] == info["pagedserve"]["requested_output_tokens"]


def test_kernel_benchmark_e2e_takes_enforce_eager() -> None:
    """benchmarks/gpu_kernels.py --e2e replays CUDA graphs by default; --enforce-eager compares eager decode."""
    import importlib.util

    # loaded by path: benchmarks/ is not a package
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "gpu_kernels.py")
    kernel_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_bench)
    assert not kernel_bench.parse_args(["--e2e", "model"]).enforce_eager
    assert kernel_bench.parse_args(["--e2e", "model", "--enforce-eager"]).enforce_eager


def test_throughput_script_compares_dtypes(tiny_llama: Path) -> None:
    info, stdout = _run_benchmark(tiny_llama, "--skip-hf", "--compare-dtype", "bfloat16", "--agreement-prompts", "2")
    d = info["dtypes"]
    assert "bfloat16 / float32" in stdout and "top-1 agreement" in stdout
    for dtype in ("float32", "bfloat16"):
        assert d[dtype]["generated_tokens"] == d[dtype]["requested_output_tokens"] > 0
    assert 0.0 <= d["top1_agreement"] <= 1.0 and d["agreement_prompts"] == 2
    assert d["total_tok_s_ratio"] == pytest.approx(d["bfloat16"]["total_tok_s"] / d["float32"]["total_tok_s"], rel=1e-2)


def test_a_dtype_agrees_with_itself(tiny_llama: Path) -> None:
    # teacher-forced scoring of float32's own greedy tokens: its top-1 at (nearly) every position
    info, _ = _run_benchmark(tiny_llama, "--skip-hf", "--compare-dtype", "float32", "--agreement-prompts", "4")
    assert info["dtypes"]["top1_agreement"] >= 0.95


def test_spec_decode_script_reports_every_workload_and_concurrency(model_dirs, capsys) -> None:
    """benchmarks/spec_decode.py on a tiny looping checkpoint: one row per workload, concurrency,
    method and async scheduling off and on, with the speculation counts (speed itself is not
    asserted)."""
    spec = importlib.import_module("benchmarks.spec_decode")
    model = str(model_dirs("llama", attention_scale=0.005))
    spec.main(["--model", model, "--concurrency", "1", "2", "--input-len", "32", "--output-len", "24", "--repeats", "1",
               "--device", "cpu", "--async-scheduling"])
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    rows = {(r["workload"], r["concurrency"], r["method"], r["async_scheduling"]): r for r in report["rows"]}
    assert set(rows) == {(w, c, m, a) for w in ("random", "repetitive") for c in (1, 2) for m in ("ngram", "suffix")
                         for a in (False, True)}
    for (*_, a), row in rows.items():
        assert row["plain_tokens_per_s"] > 0 and row["spec_tokens_per_s"] > 0 and 0 <= row["acceptance_rate"] <= 1
        assert ("vs_sync" in row) == a
        assert row["paired_ratio"] == row["ratio"]  # one repeat: one pair, the best of each
    for m in ("ngram", "suffix"):
        for a in (False, True):
            assert any(r["drafts"] > 0 and r["mean_acceptance_length"] > 1 for k, r in rows.items() if k[2:] == (m, a))
    # the control's sampled output hardly repeats itself, far less than the repetitive workload's greedy output
    for c in (1, 2):
        control = rows["random", c, "ngram", False]["output_repeat_rate"]
        assert control < 0.2 and control < rows["repetitive", c, "ngram", False]["output_repeat_rate"]
    assert out[-1 - len(rows) - 1].split()[:3] == ["workload", "C", "method"]  # the table, one line per row


def _last_json(script: list[str]) -> dict:
    """Run benchmarks/<script[0]> with the rest as its arguments; the JSON object it prints last."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:]], check=False,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", [
    ["linear_cpu.py", "--rows", "1", "5", "--rounds", "1", "--layers", "1", "--int8"],
    ["decode_attention_cpu.py", "--baseline-rev", "HEAD", "--batch", "3", "--context", "40", "--layers", "2",
     "--rounds", "1"],
])
def test_cpu_kernel_benchmarks_agree_with_their_references(script: list[str]) -> None:
    """Both compare a C kernel with a reference in one run; the outputs must agree."""
    from kernels import f32_linear_cpu

    if not f32_linear_cpu.available():
        pytest.skip("no C compiler")
    info = _last_json(script)
    diffs = [r["max_abs_diff"] for r in info["results"].values()] if "results" in info else [info["max_abs_diff"]]
    assert max(diffs) < 1e-4, info


@pytest.mark.parametrize("script", [
    ["rows_cpu.py", "--tokens", "32", "--rounds", "1"],
    ["sampler_cpu.py", "--rows", "4", "--vocab", "1000", "--rounds", "1"],
])
def test_cpu_op_benchmarks_report_a_ratio_per_op(script: list[str]) -> None:
    from kernels import rows_cpu

    if rows_cpu._library() is None:
        pytest.skip("no C compiler")
    info = _last_json(script)
    ratios = [op["ratio"] for op in info["ops"].values()] if "ops" in info else [info["ratio"]]
    assert len(ratios) == (3 if "ops" in info else 1) and all(r > 0 for r in ratios), info
