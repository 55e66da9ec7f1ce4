"""The whole stack under load, against the offline engine on the same prompts, with the CPU each
process spent. The load and its figures are `pagedserve bench serve`'s (pagedserve/bench/).

    python benchmarks/serve.py --launch DIR --max-concurrency 32 --compare-offline

--launch starts `pagedserve serve DIR` itself; --compare-offline then stops it and runs the
offline LLM.generate on the same prompts in this process, printing the stack's output tokens/s
as a ratio to offline, and the share of worker step time during which the engine sat idle waiting
for results (from the engine's and worker's /metrics). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pagedserve.bench.datasets import add_dataset_args, load_requests
from pagedserve.bench.metrics import format_table, summarize
from pagedserve.bench.serve import arrival_gaps, request_body, run_load


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def launch(model_dir: str, port: int, args, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`pagedserve serve DIR` with the load's flags (and ``extra`` serve flags), once healthy."""
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", model_dir, "--port", str(port),
           "--frontends", str(args.frontends), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--engine-metrics-port", str(args.engine_metrics_port), "--worker-metrics-port", str(args.worker_metrics_port),
           "--frontend-metrics-port", "0", *extra]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pagedserve serve exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the stack did not become healthy")


def stack_processes(proc: subprocess.Popen) -> dict:
    """The children of `pagedserve serve` by role: engine, worker-0.., frontend-0.."""
    import psutil

    roles: dict = {}
    for child in psutil.Process(proc.pid).children():
        cmd = child.cmdline()
        role = cmd[cmd.index("pagedserve.cli") + 1] if "pagedserve.cli" in cmd else child.name()
        if role != "engine":
            role = f"{role}-{sum(r.startswith(role) for r in roles)}"
        roles[role] = child
    return roles


def cpu_seconds(roles: dict) -> dict[str, float]:
    """User+system CPU seconds of each process, its live descendants and its reaped children."""
    import psutil

    out = {}
    for role, p in roles.items():
        total = 0.0
        for q in [p, *p.children(recursive=True)]:
            try:
                t = q.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + (t.children_user + t.children_system if q is p else 0.0)
        out[role] = total
    return out


def cpu_report(before: dict[str, float], after: dict[str, float], output_tokens: int) -> dict:
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    total = sum(used.values())
    light = sum(v for role, v in used.items() if not role.startswith("worker"))
    per_1k = {role: 1000 * v / output_tokens if output_tokens else None for role, v in used.items()}
    return {"cpu_s": used, "cpu_s_per_1k_tokens": per_1k, "cpu_s_total": total,
            "frontend_engine_cpu_share": light / total if total else None}


def offline(model_dir: str, requests, args, max_num_seqs: int) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"max_num_seqs": max_num_seqs, "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed}


def load(args, model_dir: str) -> dict:
    """The load against the launched stack, summarized under `pagedserve bench serve`'s keys."""
    from transformers import AutoTokenizer

    base = f"http://127.0.0.1:{args.port}"
    model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))["data"][0]["id"]
    requests = load_requests(args, len(AutoTokenizer.from_pretrained(model_dir)))
    bodies = [request_body(r, model, False, True, 0.0) for r in requests]
    gaps = arrival_gaps(len(requests), args.request_rate, 1.0, args.seed)
    outputs, duration = asyncio.run(run_load(base + "/v1/completions", bodies, requests, gaps, args.max_concurrency))
    return requests, summarize(outputs, duration, [50.0, 99.0])


def add_launch_args(ap: argparse.ArgumentParser) -> None:
    """The stack `--launch` starts, and the load sent to it (the dataset flags of `pagedserve bench`)."""
    ap.add_argument("--launch", required=True, help="start `pagedserve serve DIR` on --port")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--engine-metrics-port", type=int, default=8001)
    ap.add_argument("--worker-metrics-port", type=int, default=8002)
    add_dataset_args(ap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(ap)
    ap.add_argument("--compare-offline", action="store_true")
    ap.set_defaults(max_concurrency=32, num_prompts=128, random_input_len=144, random_output_len=72,
                    random_range_ratio=0.75)
    args = ap.parse_args()

    proc = launch(args.launch, args.port, args)
    roles = stack_processes(proc)
    try:
        cpu_before = cpu_seconds(roles)
        requests, report = load(args, args.launch)
        report.update(benchmark="serve", max_concurrency=args.max_concurrency, request_rate=args.request_rate)
        report["cpu"] = cpu_report(cpu_before, cpu_seconds(roles), report["total_output_tokens"])
        engine, worker = scrape(args.engine_metrics_port), scrape(args.worker_metrics_port)
        busy = worker.get("pagedserve_worker_forward_seconds_sum", 0) + worker.get("pagedserve_worker_sampling_seconds_sum", 0)
        wait = engine.get("pagedserve_engine_worker_wait_seconds_total", 0)
        report["worker_step_s"], report["engine_wait_s"] = busy, wait
        report["engine_idle_share_of_worker_time"] = wait / busy if busy else None
    finally:
        proc.terminate()
        proc.wait(30)
    print(format_table(report, [50.0, 99.0], ["ttft", "tpot", "itl"]))
    if args.compare_offline:
        # Offline twice: batches capped at the load's concurrency (the stack's own cost, same
        # batches), and uncapped (what the offline API reaches with every prompt at once).
        for key, seqs in (("offline", min(args.max_num_seqs, args.max_concurrency)), ("offline_uncapped", args.max_num_seqs)):
            off = report[key] = offline(args.launch, requests, args, seqs)
            report["ratio_to_" + key] = report["output_throughput"] / off["output_tokens_per_s"]
            print(f"  offline (max_num_seqs={seqs}) {off['output_tokens_per_s']:.1f} tok/s; "
                  f"stack/offline = {report['ratio_to_' + key]:.3f}")
    cpu = report["cpu"]
    for role, per_1k in cpu["cpu_s_per_1k_tokens"].items():
        print(f"  CPU {role:11s} {cpu['cpu_s'][role]:8.2f} s   {per_1k or 0:7.2f} s per 1k output tokens")
    print(f"  frontend+engine share of the stack's CPU: {100 * (cpu['frontend_engine_cpu_share'] or 0):.1f}%")
    if report["engine_idle_share_of_worker_time"] is not None:
        print(f"  engine idle (waiting on workers) for {100 * report['engine_idle_share_of_worker_time']:.1f}% "
              "of worker step time")
    for bulky in ("input_lens", "output_lens", "ttfts", "itls", "start_times", "token_times", "generated_texts", "errors"):
        report.pop(bulky)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
