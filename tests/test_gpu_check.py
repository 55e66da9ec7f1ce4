"""benchmarks/gpu_check.sh on the CPU: every part is in the JSON, passed or skipped with a reason, and
the part runner keeps earlier figures when a later part fails, hangs or runs out of budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["install", "environment", "model", "decode_attention_grid", "tests_gpu_path", "e2e_decode_cuda_graphs",
         "e2e_decode_eager", "throughput_bf16", "tests_kernels", "tests_parity"]
CUDA_PARTS = {"decode_attention_grid", "tests_gpu_path", "e2e_decode_cuda_graphs", "e2e_decode_eager",
              "tests_kernels", "tests_parity"}


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def test_tiny_mode_writes_every_part_under_out(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    cmd = ["bash", "benchmarks/gpu_check.sh", "--tiny", "--budget-s", "120", "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report_path = tmp_path / "out" / "gpu_check.json"
    assert proc.stdout.strip().splitlines()[-1].endswith(f"figures in {report_path}")
    report = json.loads(report_path.read_text())
    assert list(report["parts"]) == PARTS and report["mode"] == "tiny"
    for name, part in report["parts"].items():
        if name in CUDA_PARTS:
            assert part == {"status": "skipped", "reason": "--tiny"}
        else:
            assert part["status"] == "passed", (name, part)
    assert report["summary"] == {"passed": 4, "failed": 0, "timeout": 0, "skipped": 6, "pending": 0}
    assert report["parts"]["install"]["missing_after"] == []
    assert report["environment"]["torch"] and isinstance(report["environment"]["cuda"], bool)
    throughput = report["parts"]["throughput_bf16"]["figures"]
    assert throughput["settings"]["dtype"] == "bfloat16" and throughput["settings"]["num_prompts"] == 4
    assert throughput["pagedserve"]["generated_tokens"] == throughput["pagedserve"]["requested_output_tokens"] > 0
    assert report["headline"] == {
        "decode_attention_pct_peak_long_context": None, "batch1_pct_roofline_cuda_graphs": None,
        "batch1_pct_roofline_eager": None,
        "throughput_bf16_generated_tok_s": throughput["pagedserve"]["generated_tok_s"],
    }
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "=== model (exit 0) ===" in log and "=== throughput_bf16 (exit 0) ===" in log


def _check(tmp_path: Path, budget_s: float) -> object:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return gpu_check.Check(tmp_path / "report.json", work, budget_s, env)


def _part(name: str, code: str, cap_s: float = 30, kind: str = "json") -> object:
    return gpu_check.Part(name, [sys.executable, "-c", code], cap_s, kind=kind, needs_cuda=False)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_failed_and_hung_parts_keep_the_other_figures(tmp_path: Path) -> None:
    check = _check(tmp_path, budget_s=60)
    check.plan(["ok", "bad", "hung"])
    check.run(_part("ok", "import json; print('table'); print(json.dumps({'tok_s': 12.5}))"))
    check.run(_part("bad", "print('half done'); raise SystemExit('boom: kernel failed')"))
    # the hung part's own child must die with it: parts run as process groups
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print('child', c.pid, flush=True); time.sleep(120)")
    started = time.monotonic()
    check.run(_part("hung", hang, cap_s=3))
    assert time.monotonic() - started < 30
    report = json.loads((tmp_path / "report.json").read_text())
    ok, bad, hung = (report["parts"][n] for n in ("ok", "bad", "hung"))
    assert ok["status"] == "passed" and ok["figures"] == {"tok_s": 12.5}
    assert bad["status"] == "failed" and bad["returncode"] == 1 and "boom: kernel failed" in bad["error_tail"]
    assert hung["status"] == "timeout" and hung["returncode"] is None
    child_pid = int(hung["error_tail"].split("child ")[1].split()[0])
    assert _gone(child_pid)
    assert report["summary"] == {"passed": 1, "failed": 1, "timeout": 1, "skipped": 0, "pending": 0}


def test_budget_bounds_the_run_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    check = _check(tmp_path, budget_s=gpu_check.MIN_PART_S + 2)
    check.plan(["long", "next"])
    started = time.monotonic()
    check.run(_part("long", "import time; time.sleep(120)", cap_s=100))
    check.run(_part("next", "print('never')"))
    assert time.monotonic() - started < 40
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"]["long"]["status"] == "timeout"
    assert report["parts"]["next"] == {"status": "skipped", "reason": "no time left in the budget"}


def test_headline_reads_the_goals_off_the_figures() -> None:
    grid = {"rows": [{"context": 2048, "triton_pct_peak": 90.0}, {"context": 8192, "triton_pct_peak": 71.5},
                     {"context": 32768, "triton_pct_peak": 64.0}, {"context": 32768}]}
    parts = {"decode_attention_grid": {"status": "passed", "figures": grid},
             "e2e_decode_cuda_graphs": {"status": "passed", "figures": {"pct_roofline": 61.0}},
             "e2e_decode_eager": {"status": "failed", "error_tail": "boom"},
             "throughput_bf16": {"status": "pending"}}
    assert gpu_check.headline(parts) == {
        "decode_attention_pct_peak_long_context": 71.5, "batch1_pct_roofline_cuda_graphs": 61.0,
        "batch1_pct_roofline_eager": None, "throughput_bf16_generated_tok_s": None,
    }


def test_pytest_parts_count_outcomes_and_name_failures(tmp_path: Path) -> None:
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_broken():\n    assert 1 == 2\n\n"
                     "@pytest.mark.skip(reason='no gpu')\ndef test_later():\n    pass\n")
    check = _check(tmp_path, budget_s=60)
    check.plan(["tests"])
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tests)]
    fields = check.run(gpu_check.Part("tests", cmd, 60, kind="pytest", needs_cuda=False))
    assert fields["status"] == "failed"
    counts = fields["tests"]
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert len(counts["failed_ids"]) == 1 and counts["failed_ids"][0].endswith("test_sample.py::test_broken")


@pytest.mark.parametrize("bad", [["--parts", "decode_attention_grid,warp_drive"], ["--budget-s", "soon"]])
def test_bad_arguments_are_refused_with_a_message(bad: list[str]) -> None:
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", *bad], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr
