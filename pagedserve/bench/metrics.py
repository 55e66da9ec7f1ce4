"""A serving benchmark's result under vLLM's keys, and its printed table."""

from __future__ import annotations

import statistics

from pagedserve.bench.serve import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted xs."""
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _series(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    ok = [o for o in outputs if o.success]
    return {
        "ttft": [o.ttft for o in ok],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1],
        "itl": [x for o in ok for x in o.itl],
        "e2el": [o.latency for o in ok],
    }


def peak_output_rate(outputs: list[RequestOutput]) -> tuple[float, int]:
    """(most chunks received in any one-second window, most requests in flight at once)."""
    per_second: dict[int, int] = {}
    for o in outputs:
        for t in o.token_times:
            per_second[int(t)] = per_second.get(int(t), 0) + 1
    events = sorted([(o.start, 1) for o in outputs] + [(o.start + o.latency, -1) for o in outputs])
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return float(max(per_second.values(), default=0)), peak


def summarize(outputs: list[RequestOutput], duration: float, percentiles: list[float]) -> dict:
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    peak_tps, peak_live = peak_output_rate(outputs)
    result = {
        "duration": duration, "completed": len(ok), "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_tps, "max_concurrent_requests": peak_live,
    }
    for name, xs in _series(outputs).items():
        xs = sorted(xs)
        result[f"mean_{name}_ms"] = statistics.fmean(xs) * 1000 if xs else 0.0
        result[f"median_{name}_ms"] = statistics.median(xs) * 1000 if xs else 0.0
        result[f"std_{name}_ms"] = statistics.pstdev(xs) * 1000 if xs else 0.0
        for q in percentiles:
            result[f"p{q:g}_{name}_ms"] = percentile(xs, q) * 1000 if xs else 0.0
    result.update({
        "input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_tokens for o in outputs],
        "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
        "start_times": [o.start for o in outputs], "token_times": [o.token_times for o in outputs],
        "generated_texts": [o.text for o in outputs], "errors": [o.error for o in outputs],
    })
    return result


def format_table(result: dict, percentiles: list[float], metrics: list[str]) -> str:
    rows = [("Successful requests:", result["completed"]), ("Failed requests:", result["failed"]),
            ("Benchmark duration (s):", result["duration"]),
            ("Total input tokens:", result["total_input_tokens"]),
            ("Total generated tokens:", result["total_output_tokens"]),
            ("Request throughput (req/s):", result["request_throughput"]),
            ("Output token throughput (tok/s):", result["output_throughput"]),
            ("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
            ("Peak concurrent requests:", result["max_concurrent_requests"]),
            ("Total Token throughput (tok/s):", result["total_token_throughput"])]
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<45}{v:<15.2f}" if isinstance(v, float) else f"{k:<45}{v:<15}" for k, v in rows]
    for name in metrics:
        lines.append("{s:{c}^60}".format(s=_TITLES[name], c="-"))
        upper = name.upper()
        lines.append(f"{'Mean ' + upper + ' (ms):':<45}{result[f'mean_{name}_ms']:<15.2f}")
        lines.append(f"{'Median ' + upper + ' (ms):':<45}{result[f'median_{name}_ms']:<15.2f}")
        for q in percentiles:
            lines.append(f"{f'P{q:g} ' + upper + ' (ms):':<45}{result[f'p{q:g}_{name}_ms']:<15.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)
