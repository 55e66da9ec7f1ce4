"""One bounded check of the GPU path, every figure in one JSON file (run it via benchmarks/gpu_check.sh).

Parts, in order: install (what the GPU image lacks, from .whl/ or pip), environment (torch, CUDA,
device), model (the qwen2.5-1.5b preset as qwen2, built in the background), the decode-attention
bandwidth grid, the CUDA path tests, batch-1 decode against the roofline with and without CUDA
graphs, the bf16 offline throughput, the kernel tests natively and the parity suites with CUDA
cases. Each part runs as its own process group under its own timeout and a budget for the whole
run; the JSON is rewritten after every part, so a failed or killed part never loses the others'
figures (the part runner is gpu_check_runner.py). Without CUDA (or with --tiny) the CUDA parts are
recorded as skipped and the rest run on a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# headline is this script's too: the tests read the report's goals as gpu_check.headline
from benchmarks.gpu_check_runner import MIN_PART_S, TAIL_CHARS, Check, Part, headline  # noqa: F401

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
    grid = "--batch-sizes 1,8,32,128 --context-lens 512,2048,8192,32768 --iters 20"
    tiny_workload = ("--num-prompts 4 --input-len 8 16 --output-len 4 8 --gemm-size 128 --gemm-reps 2"
                     " --threads 2")
    workload = tiny_workload.split() if tiny else ["--num-prompts", "256", "--gemm-device", "cuda"]
    return [
        Part("model", [py, "-m", "pagedserve.cli", "make-test-model", m, "--arch", "qwen2", "--size", size], 180,
             needs_cuda=False),
        Part("decode_attention_grid", [*kernels, *grid.split()], 90),
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
