"""Pipeline parallelism: the bubble of each stage and the throughput of PP=2 against one rank.

    python benchmarks/pipeline.py --launch ~/.cache/pagedserve/models/llama-smol135 --repeats 2

Starts `pagedserve serve DIR -pp 2` and `-pp 1` in turn (PP=2, PP=1, then PP=1, PP=2, ... so that
load from other processes on the machine falls on both alike) and sends each the same random
workload (the dataset flags of `pagedserve bench`) at --max-concurrency. Around each load it
scrapes every worker rank's /metrics (rank r on --worker-metrics-port + r) for
pagedserve_worker_busy_seconds_total, the time the rank spent computing steps, not waiting for
plans or for another stage's activations. A stage's bubble is 1 - busy / wall-clock of the load.
The last line printed is one JSON object: every run, and the PP=2 / PP=1 ratio of the median
output tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from serve import add_launch_args, launch, load, scrape

BUSY = "pagedserve_worker_busy_seconds_total"


def run_once(args, pp: int) -> dict:
    """One stack with ``pp`` stages under the load: throughput and each rank's bubble."""
    proc = launch(args.launch, args.port, args, ("-pp", str(pp), *args.serve_args))
    ports = [args.worker_metrics_port + rank for rank in range(pp)]
    try:
        before = [scrape(port).get(BUSY, 0.0) for port in ports]
        _, report = load(args, args.launch)
        busy = [scrape(port).get(BUSY, 0.0) - b for port, b in zip(ports, before)]
    finally:
        proc.terminate()
        proc.wait(60)
    wall = report["duration"]
    return {"pp": pp, "wall_s": wall, "completed": report["completed"], "failed": report["failed"],
            "output_tokens": report["total_output_tokens"], "output_throughput": report["output_throughput"],
            "busy_s": busy, "bubble": [1 - b / wall for b in busy]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(ap)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (PP=2 and PP=1 each)")
    ap.add_argument("--serve-args", default="--dtype float32", help="more `pagedserve serve` flags, one string")
    ap.set_defaults(max_concurrency=8, num_prompts=32, random_input_len=64, random_output_len=32,
                    random_range_ratio=0.5, max_num_seqs=32)
    args = ap.parse_args()
    args.serve_args = args.serve_args.split()

    runs = []
    for i in range(args.repeats):
        for pp in ((2, 1) if i % 2 == 0 else (1, 2)):
            run = run_once(args, pp)
            runs.append(run)
            bubbles = " ".join(f"stage {s}: {100 * b:.1f}%" for s, b in enumerate(run["bubble"]))
            print(f"PP={pp}: {run['output_throughput']:.1f} output tok/s over {run['wall_s']:.1f} s; "
                  f"bubble {bubbles}", flush=True)
    tput = {pp: statistics.median(r["output_throughput"] for r in runs if r["pp"] == pp) for pp in (1, 2)}
    bubble = [statistics.median(r["bubble"][s] for r in runs if r["pp"] == 2) for s in range(2)]
    print(json.dumps({"benchmark": "pipeline", "model": args.launch, "max_concurrency": args.max_concurrency,
                      "num_prompts": args.num_prompts, "median_output_throughput": tput,
                      "pp2_over_pp1_output_throughput": tput[2] / tput[1], "pp2_median_bubble_per_stage": bubble,
                      "runs": runs}))


if __name__ == "__main__":
    main()
