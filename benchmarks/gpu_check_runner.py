"""The part runner of benchmarks/gpu_check.py: each part is a command run as its own process group
under its own timeout and one deadline for the whole run, its output read as JSON figures or pytest
counts; the JSON report is rewritten after every part, so a failed or killed part never loses the
others' figures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 4000
MIN_PART_S = 10  # a part with less time left than this is skipped, not started
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
