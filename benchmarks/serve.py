"""Online serving load: an async generator of streaming completions against any OpenAI-compatible
base URL, reporting requests/s, output tokens/s, and TTFT, TPOT and ITL (mean, p50, p99).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --concurrency 32
    python benchmarks/serve.py --launch DIR --concurrency 32 --compare-offline

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
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def make_prompts(n: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    return [
        ([rng.randrange(10, vocab - 10) for _ in range(rng.randint(*input_range))], rng.randint(*output_range))
        for _ in range(n)
    ]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    res, start = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.latency = time.perf_counter() - start
        res.ok = True
    except httpx.HTTPError as exc:
        res.error = repr(exc)
    return res


async def run_load(base_url: str, model: str, prompts, concurrency: int, rate: float | None, seed: int):
    url = base_url.rstrip("/") + "/completions"
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def bounded(p, n):
            async with sem:
                return await one_request(client, url, model, p, n)

        tasks = []
        start = time.perf_counter()
        for p, n in prompts:
            tasks.append(asyncio.create_task(bounded(p, n)))
            if rate:  # Poisson arrivals
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(xs: list[float]) -> dict:
        if not xs:
            return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
        xs = sorted(xs)
        pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000
        return {"mean_ms": statistics.fmean(xs) * 1000, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}

    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
        "ttft": stats([r.ttft for r in ok]), "tpot": stats(tpot), "itl": stats([x for r in ok for x in r.itl]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def launch(model_dir: str, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", model_dir, "--port", str(port),
           "--frontends", str(args.frontends), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--engine-metrics-port", str(args.engine_metrics_port), "--worker-metrics-port", str(args.worker_metrics_port)]
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


def offline(model_dir: str, prompts, args, max_num_seqs: int) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    llm.generate([{"prompt_token_ids": p} for p, _ in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in prompts]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"max_num_seqs": max_num_seqs, "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="the `model` field (default: the first of /v1/models)")
    ap.add_argument("--launch", default=None, help="start `pagedserve serve DIR` on --port first")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--compare-offline", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 256))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--engine-metrics-port", type=int, default=8001)
    ap.add_argument("--worker-metrics-port", type=int, default=8002)
    args = ap.parse_args()

    proc, roles, cpu_before = None, {}, {}
    if args.launch:
        args.base_url = f"http://127.0.0.1:{args.port}/v1"
        proc = launch(args.launch, args.port, args)
        roles = stack_processes(proc)
    try:
        models = json.load(urllib.request.urlopen(args.base_url.rstrip("/") + "/models", timeout=10))
        card = models["data"][0]
        model = args.model or card["id"]
        vocab = args.vocab_size
        if vocab is None:
            vocab = json.loads((Path(args.launch) / "config.json").read_text())["vocab_size"] if args.launch else 1000
        prompts = make_prompts(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed)
        cpu_before = cpu_seconds(roles)
        results, elapsed = asyncio.run(run_load(args.base_url, model, prompts, args.concurrency, args.request_rate, args.seed))
        report = {"benchmark": "serve", "base_url": args.base_url, "concurrency": args.concurrency,
                  "request_rate": args.request_rate, **summarize(results, elapsed)}
        if proc is not None:
            report["cpu"] = cpu_report(cpu_before, cpu_seconds(roles), report["output_tokens"])
            engine, worker = scrape(args.engine_metrics_port), scrape(args.worker_metrics_port)
            busy = worker.get("pagedserve_worker_forward_seconds_sum", 0) + worker.get("pagedserve_worker_sampling_seconds_sum", 0)
            wait = engine.get("pagedserve_engine_worker_wait_seconds_total", 0)
            report["worker_step_s"], report["engine_wait_s"] = busy, wait
            report["engine_idle_share_of_worker_time"] = wait / busy if busy else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.compare_offline and args.launch:
        # Offline twice: batches capped at the load's concurrency (the stack's own cost, same
        # batches), and uncapped (what the offline API reaches with every prompt at once).
        same = offline(args.launch, prompts, args, min(args.max_num_seqs, args.concurrency))
        full = offline(args.launch, prompts, args, args.max_num_seqs)
        report["offline"], report["offline_uncapped"] = same, full
        report["ratio_to_offline"] = report["output_tokens_per_s"] / same["output_tokens_per_s"]
        report["ratio_to_offline_uncapped"] = report["output_tokens_per_s"] / full["output_tokens_per_s"]
    s = report
    print(f"requests {s['requests']} (failed {s['failed']}) in {s['elapsed_s']:.1f}s: {s['requests_per_s']:.2f} req/s, "
          f"{s['output_tokens_per_s']:.1f} output tok/s")
    for k in ("ttft", "tpot", "itl"):
        v = s[k]
        if v["mean_ms"] is not None:
            print(f"  {k.upper():5s} mean {v['mean_ms']:8.1f} ms   p50 {v['p50_ms']:8.1f} ms   p99 {v['p99_ms']:8.1f} ms")
    if "ratio_to_offline" in s:
        for key, ratio in (("offline", "ratio_to_offline"), ("offline_uncapped", "ratio_to_offline_uncapped")):
            off = s[key]
            print(f"  offline (max_num_seqs={off['max_num_seqs']}) {off['output_tokens_per_s']:.1f} tok/s; "
                  f"stack/offline = {s[ratio]:.3f}")
    if "cpu" in s:
        cpu = s["cpu"]
        for role, per_1k in cpu["cpu_s_per_1k_tokens"].items():
            print(f"  CPU {role:11s} {cpu['cpu_s'][role]:8.2f} s   {per_1k or 0:7.2f} s per 1k output tokens")
        share = cpu["frontend_engine_cpu_share"]
        print(f"  frontend+engine share of the stack's CPU: {100 * (share or 0):.1f}%")
    if s.get("engine_idle_share_of_worker_time") is not None:
        print(f"  engine idle (waiting on workers) for {100 * s['engine_idle_share_of_worker_time']:.1f}% of worker step time")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
