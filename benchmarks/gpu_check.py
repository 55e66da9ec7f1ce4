"""One bounded check of the GPU path, every figure in one JSON file (run it via benchmarks/gpu_check.sh).

Parts, in order: install (what the GPU image lacks, from .whl/ or pip), environment (torch, CUDA,
device), model (the qwen2.5-1.5b preset as qwen2, built in the background), the decode-attention
bandwidth grid, the CUDA path tests, batch-1 decode against the roofline with and without CUDA
graphs, the bf16 offline throughput, the kernel tests natively and the parity suites with CUDA
cases. Each part runs as its own process group under its own timeout and a budget for the whole
run; the JSON is rewritten after every part, so a failed or killed part never loses the others'
figures. Without CUDA (or with --tiny) the CUDA parts are recorded as skipped and the rest run on
a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 4000
MIN_PART_S = 10  # a part with less time left than this is skipped, not started
# module -> distribution the parts import (torch and triton come with the GPU image)
REQUIRED = {
    "numpy": "numpy", "msgspec": "msgspec", "zmq": "pyzmq", "fastapi": "fastapi", "uvicorn": "uvicorn",
    "pydantic": "pydantic", "prometheus_client": "prometheus-client", "tqdm": "tqdm",
    "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "jinja2": "jinja2", "xgrammar": "xgrammar", "pytest": "pytest", "pytest_timeout": "pytest-timeout",
    "hypothesis": "hypothesis", "triton": "triton", "torch": "torch",
}
PROBE = """import json, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda": torch.cuda.is_available(), "cpus": len(__import__("os").sched_getaffinity(0))}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as exc:
    info["triton"] = f"missing: {exc}"
print(json.dumps(info))
"""
PYTEST_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


@dataclass(frozen=True)
class Part:
    """One step: a command, its timeout, how to read its output, and whether it needs CUDA."""

    name: str
    cmd: list[str]
    cap_s: float
    kind: str = "json"  # json: the last JSON line of stdout; pytest: counts from -v lines
    needs_cuda: bool = True


def pytest_counts(output: str) -> dict[str, Any]:
    """Outcome counts and failed test ids from `pytest -v` output, complete or cut off by a timeout."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfail": 0, "xpass": 0}
    failed: list[str] = []
    for test_id, outcome in PYTEST_LINE.findall(output):
        counts[outcome.lower()] += 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test_id)
    counts["failed_ids"] = failed[:30]
    return counts


def last_json_line(output: str) -> dict[str, Any] | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def headline(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals read off the figures (None where a part gave none): decode attention's best
    % of HBM peak at contexts of 8K and more, batch-1 decode's % of the roofline, bf16 tokens/s."""
    figures = {name: part.get("figures") or {} for name, part in parts.items()}
    rows = figures.get("decode_attention_grid", {}).get("rows", [])
    long_ctx = [r["triton_pct_peak"] for r in rows if r["context"] >= 8192 and "triton_pct_peak" in r]
    return {
        "decode_attention_pct_peak_long_context": max(long_ctx, default=None),
        "batch1_pct_roofline_cuda_graphs": figures.get("e2e_decode_cuda_graphs", {}).get("pct_roofline"),
        "batch1_pct_roofline_eager": figures.get("e2e_decode_eager", {}).get("pct_roofline"),
        "throughput_bf16_generated_tok_s": (figures.get("throughput_bf16", {}).get("pagedserve") or {})
        .get("generated_tok_s"),
    }


class Check:
    """Runs parts against one deadline and keeps the JSON report current."""

    def __init__(self, output: Path, work: Path, budget_s: float, env: dict[str, str]) -> None:
        self.output, self.work, self.env = output, work, env
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.report: dict[str, Any] = {"schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "budget_s": budget_s, "parts": {}}
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.log = output.with_suffix(".log")  # every part's whole output, beside the JSON

    def plan(self, names: list[str]) -> None:
        for name in names:
            self.report["parts"][name] = {"status": "pending"}
        self.log.write_text("")
        self.save()

    def save(self) -> None:
        parts = self.report["parts"].values()
        self.report["summary"] = {s: sum(p["status"] == s for p in parts)
                                  for s in ("passed", "failed", "timeout", "skipped", "pending")}
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.report["headline"] = headline(self.report["parts"])
        tmp = self.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        tmp.replace(self.output)

    def record(self, name: str, **fields: Any) -> dict[str, Any]:
        self.report["parts"][name] = fields
        self.save()
        mark = fields["status"].upper()
        tail = fields.get("error_tail", "").strip().splitlines()
        detail = fields.get("reason") or (tail[-1] if tail else "")
        print(f"[{self.report['elapsed_s']:6.1f}s] {name:<24} {mark:<8} {fields.get('elapsed_s', '')} {detail}",
              flush=True)
        return fields

    def skip(self, name: str, reason: str) -> dict[str, Any]:
        return self.record(name, status="skipped", reason=reason)

    def launch(self, part: Part) -> None:
        """Start a part in its own process group, its output into work/<name>.log."""
        log = (self.work / f"{part.name}.log").open("w")
        proc = subprocess.Popen(part.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                                start_new_session=True)
        log.close()
        self.running[part.name] = (proc, time.monotonic())

    def finish(self, part: Part) -> dict[str, Any]:
        """Wait for a launched part within its cap and the budget; kill its group past either."""
        proc, started = self.running.pop(part.name)
        left = min(part.cap_s - (time.monotonic() - started), self.deadline - time.monotonic())
        try:
            rc: int | None = proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        output = (self.work / f"{part.name}.log").read_text(errors="replace")
        with self.log.open("a") as log:
            log.write(f"=== {part.name} (exit {rc}) ===\n{output}\n")
        command = " ".join("<script>" if "\n" in arg else arg for arg in part.cmd)
        fields: dict[str, Any] = {"elapsed_s": round(time.monotonic() - started, 1), "returncode": rc,
                                  "command": command}
        if part.kind == "pytest":
            fields["tests"] = pytest_counts(output)
        elif (figures := last_json_line(output)) is not None:
            fields["figures"] = figures
        status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        if status != "passed":
            fields["error_tail"] = output[-TAIL_CHARS:]
        return self.record(part.name, status=status, **fields)

    def run(self, part: Part) -> dict[str, Any]:
        if self.deadline - time.monotonic() < MIN_PART_S:
            return self.skip(part.name, "no time left in the budget")
        self.launch(part)
        return self.finish(part)


def install(check: Check, site: Path) -> None:
    """Install the modules this interpreter lacks into `site`: from .whl/ when carried, else pip."""
    started = time.monotonic()
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    fields: dict[str, Any] = {"missing_before": missing}
    if missing:
        wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site)]
        cmd = pip + (["--no-index", "--no-deps", *wheels] if wheels else [REQUIRED[m] for m in missing])
        budget = max(check.deadline - time.monotonic() - 300, MIN_PART_S)  # leave the parts their time
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=min(180, budget))
            fields["pip_tail"] = (proc.stdout + proc.stderr)[-TAIL_CHARS:]
        except subprocess.TimeoutExpired:
            fields["pip_tail"] = "pip timed out"
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
        missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    fields.update(missing_after=missing, elapsed_s=round(time.monotonic() - started, 1))
    if missing:
        fields["error_tail"] = f"still missing: {', '.join(missing)}\n{fields.get('pip_tail', '')}"
    check.record("install", status="failed" if missing else "passed", **fields)


def plan_parts(py: str, model: Path, tiny: bool) -> list[Part]:
    """Every part after install and environment, in running order."""
    kernels, m = [py, "benchmarks/gpu_kernels.py"], str(model)
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--timeout", "120"]
    size = "tiny" if tiny else "qwen2.5-1.5b"
    workload = (["--num-prompts", "4", "--input-len", "8", "16", "--output-len", "4", "8", "--gemm-size", "128",
                 "--gemm-reps", "2", "--threads", "2"] if tiny else ["--num-prompts", "256", "--gemm-device", "cuda"])
    return [
        Part("model", [py, "-m", "pagedserve.cli", "make-test-model", m, "--arch", "qwen2", "--size", size], 180,
             needs_cuda=False),
        Part("decode_attention_grid", [*kernels, "--batch-sizes", "1,8,32,128",
                                       "--context-lens", "512,2048,8192,32768", "--iters", "20"], 90),
        Part("tests_gpu_path", [*pytest, "tests/test_gpu_path.py"], 120, kind="pytest"),
        Part("e2e_decode_cuda_graphs", [*kernels, "--e2e", m, "--max-tokens", "256"], 90),
        Part("e2e_decode_eager", [*kernels, "--e2e", m, "--max-tokens", "256", "--enforce-eager"], 90),
        Part("throughput_bf16", [py, "benchmarks/throughput.py", "--model", m, "--dtype", "bfloat16",
                                 "--skip-hf", *workload], 90, needs_cuda=False),
        Part("tests_kernels", [*pytest, "tests/kernels"], 120, kind="pytest"),
        # the model parity suites' Triton cases, and the CUDA-graph logic, with the GPU present
        Part("tests_parity", [*pytest, "tests/test_models.py", "tests/test_cuda_graphs.py",
                              "-k", "triton or cuda_graphs"], 90, kind="pytest"),
    ]


NEEDS_MODEL = ("e2e_decode_cuda_graphs", "e2e_decode_eager", "throughput_bf16")
PART_NAMES = ["install", "environment"] + [p.name for p in plan_parts("python", Path("m"), True)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU mode even with a GPU: CUDA parts skipped")
    p.add_argument("--parts", type=lambda s: [x for x in s.split(",") if x], help="run only these (comma list)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget for all parts")
    p.add_argument("--output", type=Path, help="default: $OUT/gpu_check.json, else ./gpu_check.json")
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check")),
                   help="logs, the checkpoint (reused when complete) and installed packages")
    args = p.parse_args(argv)
    unknown = sorted(set(args.parts or []) - set(PART_NAMES))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {PART_NAMES}")
    return args


def _model_ready(model: Path) -> bool:
    return (model / "generation_config.json").exists()  # make_test_model writes it last


def run_parts(check: Check, parts: list[Part], selected: list[str], cuda_skip: str | None) -> None:
    model_part, rest = parts[0], parts[1:]
    model = Path(model_part.cmd[4])

    def wait_for_model() -> bool:
        if "model" in check.running:
            check.finish(model_part)
        return _model_ready(model)

    wanted = [p for p in rest if p.name in selected and not (p.needs_cuda and cuda_skip)]
    if any(p.name in NEEDS_MODEL for p in wanted) and not _model_ready(model):
        check.launch(model_part)  # built on the CPU while the first GPU parts run
    else:
        check.skip("model", "reused: already built" if _model_ready(model) else "no part selected needs it")
    for part in rest:
        if part.name not in selected:
            check.skip(part.name, "not in --parts")
        elif part.needs_cuda and cuda_skip:
            check.skip(part.name, cuda_skip)
        elif part.name in NEEDS_MODEL and not wait_for_model():
            check.skip(part.name, "the model part did not pass")
        else:
            check.run(part)
    if "model" in check.running:
        check.finish(model_part)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = os.environ.get("OUT")
    output = (args.output or Path(out_dir or ".", "gpu_check.json")).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    paths = [str(ROOT), str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    check = Check(output, work, args.budget_s, env)
    check.plan(PART_NAMES)
    install(check, site)
    probe = check.run(Part("environment", [sys.executable, "-c", PROBE], 60, needs_cuda=False))
    check.report["environment"] = probe.get("figures")
    cuda = bool((probe.get("figures") or {}).get("cuda"))
    tiny = args.tiny or not cuda
    cuda_skip = None
    if tiny:
        cuda_skip = "--tiny" if args.tiny else "no CUDA device (torch.cuda.is_available() is False)"
    check.report["mode"] = "tiny" if tiny else "full"
    model = work / ("qwen2-tiny" if tiny else "qwen2-qwen2.5-1.5b")
    run_parts(check, plan_parts(sys.executable, model, tiny), args.parts or PART_NAMES, cuda_skip)
    summary = check.report["summary"]
    print(f"gpu_check: {summary['passed']} passed, {summary['failed']} failed, {summary['timeout']} timed out, "
          f"{summary['skipped']} skipped in {check.report['elapsed_s']} s; figures in {output}")
    return 1 if summary["failed"] or summary["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
