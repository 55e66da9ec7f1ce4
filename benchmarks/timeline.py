"""Served throughput with async scheduling off and on, interleaved in one run, and the per-step
timeline of each (engine plan, worker compute, worker idle, transport: the engine's
pagedserve_engine_step_*_seconds histograms, scraped after each load).

    python benchmarks/timeline.py DIR --repeats 2 --concurrency 16 --num-prompts 64

Each repeat launches `pagedserve serve DIR` once per mode (off, then on; the flag travels as
PAGEDSERVE_ASYNC_SCHEDULING), drives the same prompts through it with benchmarks/serve.py's load
generator, and reads the engine's metrics before stopping it. The machine may be shared, so the
modes alternate and every run is printed; the ratio is on/off output tokens/s per repeat. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as load  # benchmarks/serve.py: launch, load generator, summary, scrape

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


def run_mode(args, prompts, async_scheduling: bool) -> dict:
    os.environ["PAGEDSERVE_ASYNC_SCHEDULING"] = "1" if async_scheduling else "0"
    os.environ["PAGEDSERVE_FRONTEND_METRICS_PORT"] = "0"  # not read here; no port to collide on
    proc = load.launch(args.model_dir, args.port, args)
    try:
        base = f"http://127.0.0.1:{args.port}/v1"
        model = json.load(load.urllib.request.urlopen(base + "/models", timeout=10))["data"][0]["id"]
        # a warm-up request first: the worker's first step counts its idle time since startup
        asyncio.run(load.run_load(base, model, prompts[:1], 1, None, args.seed))
        before = load.scrape(args.engine_metrics_port)
        results, elapsed = asyncio.run(load.run_load(base, model, prompts, args.concurrency, None, args.seed))
        report = {"async_scheduling": async_scheduling, **load.summarize(results, elapsed)}
        report["timeline"] = timeline(before, load.scrape(args.engine_metrics_port))
    finally:
        proc.terminate()
        proc.wait(30)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=(128, 384))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 192))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--engine-metrics-port", type=int, default=8001)
    ap.add_argument("--worker-metrics-port", type=int, default=8002)
    args = ap.parse_args()
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    prompts = load.make_prompts(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed)
    runs, ratios = [], []
    for repeat in range(args.repeats):
        pair = [run_mode(args, prompts, mode) for mode in (False, True)]
        runs += pair
        ratios.append(pair[1]["output_tokens_per_s"] / pair[0]["output_tokens_per_s"])
        for r in pair:
            t = r["timeline"]
            parts = "  ".join(f"{p} {t[p + '_ms']:.2f}" if t[p + "_ms"] is not None else f"{p} -" for p in PARTS)
            print(f"repeat {repeat} async={'on ' if r['async_scheduling'] else 'off'} "
                  f"{r['output_tokens_per_s']:7.1f} out tok/s  TPOT mean {r['tpot']['mean_ms'] or 0:6.1f} ms  "
                  f"failed {r['failed']}  per step (ms, {t['steps']:.0f} steps): {parts}")
        print(f"repeat {repeat}: async on / off output tok/s = {ratios[-1]:.3f}")
    print(json.dumps({"benchmark": "timeline", "concurrency": args.concurrency, "ratios": ratios, "runs": runs}))


if __name__ == "__main__":
    main()
