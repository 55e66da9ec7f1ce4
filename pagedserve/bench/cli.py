"""`pagedserve bench serve|throughput|latency`, with vLLM's `vllm bench` flags and result keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path

from pagedserve.bench.datasets import add_dataset_args, load_requests


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("vllm", "openai", "openai-chat"), default="vllm",
                   help="openai-chat sends chat completions; the others, completions")
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default: /v1/completions (/v1/chat/completions for openai-chat)")
    p.add_argument("--model", default=None, help="the `model` field (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="a local model folder: its tokenizer sizes random prompts")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson arrivals; lower: burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--plot", default=None, metavar="FILE.png", help="latency CDFs and throughput over time")
    p.add_argument("--label", default=None)
    add_dataset_args(p)


def add_offline_args(p: argparse.ArgumentParser, latency: bool) -> None:
    from shared.engine_args import add_model_args

    add_model_args(p)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output-json", default=None, help="write the result as JSON to this file")
    if latency:
        p.add_argument("--input-len", type=int, default=32)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--num-iters-warmup", type=int, default=3)
        p.add_argument("--num-iters", type=int, default=10)
    else:
        add_dataset_args(p, seed=False)
        p.set_defaults(num_prompts=256, random_input_len=256, random_output_len=128)


def _tokenizer(path: str | None):
    if not path or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run_serve(args: argparse.Namespace) -> dict:
    import httpx

    from pagedserve.bench.metrics import METRICS, format_table, summarize
    from pagedserve.bench.serve import arrival_gaps, request_body, run_load

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/").removesuffix("/v1")
    chat = args.backend == "openai-chat"
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None

    try:
        model = args.model or httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError) as exc:
        raise ValueError(f"cannot reach {base} for its model list ({exc!r}); is the server up?") from None
    tokenizer = _tokenizer(args.tokenizer or args.model)
    if tokenizer is None and args.dataset_name != "sharegpt":
        raise ValueError("random prompts need --tokenizer (a local model folder) to know the vocabulary")
    requests = load_requests(args, len(tokenizer) if tokenizer is not None else 0, tokenizer)
    if chat and tokenizer is not None:
        for r in requests:  # chat takes text: token-id prompts become their text
            if not isinstance(r.prompt, str):
                r.prompt = tokenizer.decode(r.prompt)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := set(metrics) - set(METRICS):
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from {', '.join(METRICS)}")
    percentiles = [float(q) for q in args.metric_percentiles.split(",")]
    bodies = [request_body(r, model, chat, args.ignore_eos, args.temperature) for r in requests]
    gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    progress = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        progress = tqdm(total=len(requests))
    outputs, duration = asyncio.run(
        run_load(base + endpoint, bodies, requests, gaps, args.max_concurrency, progress, headers)
    )
    if progress is not None:
        progress.close()
    result = summarize(outputs, duration, percentiles)
    result.update({
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "label": args.label,
        "model_id": model, "tokenizer_id": args.tokenizer or args.model, "num_prompts": len(requests),
        "request_rate": args.request_rate, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
    })
    print(format_table(result, percentiles, metrics))
    if args.save_result:
        name = args.result_filename or f"{args.backend}-{args.request_rate}qps-{Path(model).name}-{result['date']}.json"
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        print(f"result saved to {path}")
    if args.plot:
        from pagedserve.bench.plot import plot_result

        plot_result(result, args.plot)
        print(f"plot saved to {args.plot}")
    return result


def _serve(args: argparse.Namespace) -> int:
    return 0 if run_serve(args)["completed"] else 1  # nothing completed: the run measured nothing


def _offline(kind: str):
    def run(args: argparse.Namespace) -> int:
        from pagedserve.bench.offline import run_latency, run_throughput

        start = time.perf_counter()
        result = (run_latency if kind == "latency" else run_throughput)(args)
        if kind == "latency":
            print(f"Avg latency: {result['avg_latency']:.4f} seconds")
            for q, v in result["percentiles"].items():
                print(f"{q}% percentile latency: {v:.4f} seconds")
        else:
            print(f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} "
                  f"total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s")
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(result))
        print(f"(benchmark took {time.perf_counter() - start:.1f}s)")
        return 0

    return run


BENCH_HELP = "benchmark a server (serve) or the offline engine (throughput, latency)"


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help=BENCH_HELP)
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("serve", help="streaming load against an OpenAI-compatible server")
    add_serve_args(p)
    p.set_defaults(func=_serve)
    for kind, help in (("throughput", "offline generation throughput"), ("latency", "offline latency of one batch")):
        p = kinds.add_parser(kind, help=help)
        add_offline_args(p, kind == "latency")
        p.set_defaults(func=_offline(kind))
