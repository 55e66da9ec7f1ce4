"""Served throughput with async scheduling off and on, interleaved in one run, and the per-step
timeline of each (engine plan, worker compute, worker idle, transport: the engine's
pagedserve_engine_step_*_seconds histograms, scraped after each load).

    python benchmarks/timeline.py --launch DIR --repeats 2 --max-concurrency 16 --num-prompts 64

Each repeat launches `pagedserve serve DIR` once per mode (off, then on; the flag travels as
PAGEDSERVE_ASYNC_SCHEDULING), drives the same requests through it with benchmarks/serve.py's load
(`pagedserve bench serve`'s client) after a one-request warm-up, and reads the engine's metrics
before stopping it. The machine may be shared, so the modes alternate and every run is printed;
the ratio is on/off output tokens/s per repeat. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as stack  # benchmarks/serve.py: launch, load, scrape

PARTS = ("plan", "worker_compute", "worker_idle", "transport")


def timeline(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean milliseconds per step of each part between two scrapes, and the number of steps."""
    out: dict[str, float | None] = {}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    for part in PARTS:
        count, total = delta(f"pagedserve_engine_step_{part}_seconds_count"), delta(f"pagedserve_engine_step_{part}_seconds_sum")
        out[f"{part}_ms"] = 1000 * total / count if count else None
    out["steps"] = delta("pagedserve_engine_step_worker_compute_seconds_count")
    return out


def run_mode(args: argparse.Namespace, async_scheduling: bool) -> dict:
    os.environ["PAGEDSERVE_ASYNC_SCHEDULING"] = "1" if async_scheduling else "0"
    proc = stack.launch(args.launch, args.port, args)
    try:
        # a warm-up request first: the worker's first step counts its idle time since startup
        stack.load(argparse.Namespace(**{**vars(args), "num_prompts": 1}), args.launch)
        before = stack.scrape(args.engine_metrics_port)
        _requests, report = stack.load(args, args.launch)
        after = stack.scrape(args.engine_metrics_port)
    finally:
        proc.terminate()
        proc.wait(30)
    keep = ("output_throughput", "mean_tpot_ms", "mean_ttft_ms", "p99_ttft_ms", "completed", "failed")
    errors = sorted({e for e in report["errors"] if e})[:3]
    return {"async_scheduling": async_scheduling, **{k: report[k] for k in keep}, "errors": errors,
            "timeline": timeline(before, after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stack.add_launch_args(ap)
    ap.add_argument("--repeats", type=int, default=2)
    ap.set_defaults(num_prompts=64, random_input_len=256, random_output_len=128, random_range_ratio=0.5)
    args = ap.parse_args()
    runs, ratios = [], []
    for repeat in range(args.repeats):
        pair = [run_mode(args, mode) for mode in (False, True)]
        runs += pair
        ratios.append(pair[1]["output_throughput"] / pair[0]["output_throughput"])
        for r in pair:
            t = r["timeline"]
            parts = "  ".join(f"{p} {t[p + '_ms']:.2f}" if t[p + "_ms"] is not None else f"{p} -" for p in PARTS)
            print(f"repeat {repeat} async={'on ' if r['async_scheduling'] else 'off'} "
                  f"{r['output_throughput']:7.1f} out tok/s  TPOT mean {r['mean_tpot_ms']:6.1f} ms  "
                  f"failed {r['failed']}  per step (ms, {t['steps']:.0f} steps): {parts}")
            for error in r["errors"]:
                print(f"  error: {error}")
        print(f"repeat {repeat}: async on / off output tok/s = {ratios[-1]:.3f}")
    print(json.dumps({"benchmark": "timeline", "max_concurrency": args.max_concurrency, "ratios": ratios, "runs": runs}))


if __name__ == "__main__":
    main()
