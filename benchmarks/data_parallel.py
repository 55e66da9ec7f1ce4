"""Data-parallel routing on a shared-prefix workload: prefix affinity against round robin, in one run.

    python benchmarks/data_parallel.py                   # the small demo checkpoint, 2 replicas
    python benchmarks/data_parallel.py --model DIR --num-prompts 128 --repeats 3

Starts two engine+worker replicas and two frontends connected to both: one routing by prefix
affinity, one round robin (--data-parallel-routing). The workload is vLLM's prefix_repetition
set (pagedserve/bench/datasets.py): --num-prefixes system prompts, each request one of them plus
its own suffix, shuffled, sent at most --max-concurrency at a time. Each phase draws fresh
prompts (its own seed), so no phase finds another's prefixes cached; the two routings alternate
phase by phase (A B, then B A, ...) so that load from other processes on the machine falls on
both alike. Each replica's KV cache is --kv-blocks blocks: by default room for about half the
system prompts, as when a cache cannot hold every tenant's prompt.

Per phase: the prefix-cache hit rate (hit / queried prompt tokens, summed over both engines'
/metrics), output and total token throughput, and the requests each replica served. The last
line printed is one JSON object with every phase and the affinity / round-robin ratios of the
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.serve import scrape
from pagedserve.bench.datasets import prefix_repetition_requests
from pagedserve.bench.metrics import summarize
from pagedserve.bench.serve import request_body, run_load
from pagedserve.serve import demo_model, free_port

ROUTINGS = ("affinity", "round_robin")
HIT, QUERIED = "pagedserve_engine_prefix_cache_hit_tokens_total", "pagedserve_engine_prefix_cache_queried_tokens_total"
SERVED = "pagedserve_engine_request_queue_time_seconds_count"


class Stack:
    """Two replicas (engine + worker each) and one frontend per routing, all as CLI processes."""

    def __init__(self, args: argparse.Namespace):
        env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING")
        cli = [sys.executable, "-m", "pagedserve.cli"]
        common = ["--model", args.model, "--max-model-len", str(args.max_model_len), "--served-model-name", "bench",
                  "--num-gpu-blocks-override", str(args.kv_blocks), "--max-num-seqs", str(args.max_num_seqs)]
        addrs = [[f"tcp://127.0.0.1:{free_port()}" for _ in range(3)] for _ in range(args.replicas)]
        self.engine_ports = [free_port() for _ in addrs]
        self.ports = {routing: free_port() for routing in ROUTINGS}
        self.procs = []
        for (inp, out, wrk), port in zip(addrs, self.engine_ports):
            self.procs.append(subprocess.Popen([*cli, "worker", *common, "--worker-addr", wrk, "--metrics-port", "0"],
                                               env=env))
            self.procs.append(subprocess.Popen([*cli, "engine", *common, "--frontend-input", inp, "--frontend-output",
                                                out, "--worker-addr", wrk, "--metrics-port", str(port)], env=env))
        for routing, port in self.ports.items():
            self.procs.append(subprocess.Popen([*cli, "frontend", "--engine-input", *(a[0] for a in addrs),
                                                "--engine-output", *(a[1] for a in addrs), "--port", str(port),
                                                "--data-parallel-routing", routing], env=env))

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while True:
                if any(p.poll() is not None for p in self.procs):
                    raise SystemExit("a process of the stack exited")
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the stack did not become healthy")
                time.sleep(0.5)
        time.sleep(6)  # every frontend has heard from every replica (they ping each second)

    def engines(self) -> list[dict[str, float]]:
        return [scrape(port) for port in self.engine_ports]

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def run_phase(stack: Stack, routing: str, seed: int, args: argparse.Namespace) -> dict:
    """One pass of the workload through one frontend, with fresh prompts."""
    data = argparse.Namespace(num_prompts=args.num_prompts, seed=seed, prefix_repetition_prefix_len=args.prefix_len,
                              prefix_repetition_suffix_len=args.suffix_len,
                              prefix_repetition_num_prefixes=args.num_prefixes,
                              prefix_repetition_output_len=args.output_len)
    requests = prefix_repetition_requests(data, args.vocab_size)
    bodies = [request_body(r, "bench", chat=False, ignore_eos=True, temperature=0.0) for r in requests]
    before = stack.engines()
    url = f"http://127.0.0.1:{stack.ports[routing]}/v1/completions"
    outputs, duration = asyncio.run(run_load(url, bodies, requests, [0.0] * len(bodies), args.max_concurrency))
    after = stack.engines()
    delta = [{k: a[k] - b.get(k, 0.0) for k in (HIT, QUERIED, SERVED)} for a, b in zip(after, before)]
    result = summarize(outputs, duration, [])
    if result["failed"]:
        raise SystemExit(f"{routing}: {result['failed']} request(s) failed: {result['errors'][:3]}")
    return {
        "routing": routing, "seed": seed, "duration_s": round(duration, 3),
        "prefix_cache_hit_rate": round(sum(d[HIT] for d in delta) / max(1.0, sum(d[QUERIED] for d in delta)), 4),
        "output_throughput": round(result["output_throughput"], 2),
        "total_token_throughput": round(result["total_token_throughput"], 2),
        "requests_per_replica": [int(d[SERVED]) for d in delta],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the small demo checkpoint)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-prefixes", type=int, default=8, help="system prompts")
    p.add_argument("--prefix-len", type=int, default=256, help="tokens per system prompt")
    p.add_argument("--suffix-len", type=int, default=32, help="each user's own tokens")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32, help="requests per phase")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="phases per routing (alternating)")
    p.add_argument("--kv-blocks", type=int, default=96, help="KV blocks per replica (16 tokens each)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.model = args.model or demo_model()
    args.vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    stack = Stack(args)
    phases = []
    try:
        stack.wait_ready()
        for rep in range(args.repeats):
            for routing in ROUTINGS if rep % 2 == 0 else ROUTINGS[::-1]:
                phase = run_phase(stack, routing, seed=1000 + len(phases), args=args)
                print(json.dumps(phase), flush=True)
                phases.append(phase)
    finally:
        stack.close()
    summary = {}
    for routing in ROUTINGS:
        mine = [p for p in phases if p["routing"] == routing]
        summary[routing] = {key: statistics.median(p[key] for p in mine)
                            for key in ("prefix_cache_hit_rate", "output_throughput", "total_token_throughput")}
    ratios = {key: round(summary["affinity"][key] / max(1e-9, summary["round_robin"][key]), 3)
              for key in summary["affinity"]}
    print(f"affinity / round_robin (medians of {args.repeats} phases each): {ratios}", flush=True)
    print(json.dumps({"config": {k: v for k, v in vars(args).items()}, "phases": phases, "median": summary,
                      "affinity_over_round_robin": ratios}))


if __name__ == "__main__":
    main()
