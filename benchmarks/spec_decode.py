"""Speculative decoding (each --methods entry) against plain decoding, on the same prompts in one
invocation.

    python benchmarks/spec_decode.py [--methods ngram suffix draft_model] [--concurrency 1 4 16 64] \\
        [--output-len 32] [--repeats 2] [--async-scheduling]

Builds (or reuses) the random-weight smol135 checkpoint of benchmarks/throughput.py and drives the
offline engine core (the scheduler and model runner `LLM` uses) with at most C requests running,
for each concurrency C, 2*C prompts per run (at least 4). Plain and speculative runs alternate
(plain, then each method), repeated, so machine noise hits all alike; each figure is the best of
the repeats, and "paired" is the median over the repeats of each run's ratio to the plain run just
before it (what drifts over minutes on a shared machine hits both of a pair alike).
draft_model drafts with the checkpoint's first --draft-layers (2) layers: its own copy of them,
with its own KV cache, run by a second model runner (plain decoding runs on the first). eagle and
eagle3 draft with a random-weight head: its proposals are almost never accepted, so their rows
measure what the head costs while the adaptive rule tries it and then turns it off, not a gain;
--eagle-head DIR: eagle drafts with a trained head instead (benchmarks/train_eagle.py).
--async-scheduling: every run (plain and each method) is made with async scheduling off and on,
interleaved; with it on the workers propose (a model runner of their own per method). Offline the
step planned ahead runs after the current one (no overlap, as no worker process computes
meanwhile): the figure is what the one-step-late proposals cost or gain, not the overlap's gain.

Workloads:
  random      the control, where proposals should fail: prompts of random token ids, and output
              *sampled* at temperature 1 with a seed per request (the same in every mode). A
              random-weight model's next-token distribution is close to uniform over the whole
              vocabulary, so the output does not repeat itself or the prompt (its repeat rate, the
              share of output tokens whose bigram occurred before in the request, is reported):
              nothing a proposer finds is likely to be accepted. Greedy output would not do: a
              random-weight smol135 falls into loops from random prompts too.
  repetitive  greedy output from a random 16-token span repeated to the prompt's length: the
              output loops (the model repeats its context), so what the request holds predicts it,
              as when a prompt holds a text and asks for it back.
Reported per workload, concurrency, method and async scheduling: output tokens/s of plain and
speculative decoding, their ratio, the acceptance rate (accepted / proposed tokens), the mean
acceptance length (1 + accepted per verification) and the number of verifications (with async
scheduling on also the speculative tokens/s over the same method's with it off); a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.checkpoints import DEFAULT_CACHE, resolve_model
from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams
from shared.speculative import SPEC_METHODS, SpeculativeConfig

WORKLOADS = ("random", "repetitive")


def prompts(workload: str, num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        if workload == "random":
            out.append([rng.randrange(vocab) for _ in range(length)])
        else:
            span = [rng.randrange(vocab) for _ in range(16)]
            out.append((span * (length // 16 + 1))[:length])
    return out


def sampling(workload: str, output_len: int, index: int) -> SamplingParams:
    if workload == "random":
        return SamplingParams(temperature=1.0, seed=1000 + index, max_tokens=output_len, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)


def run(runner, spec: SpeculativeConfig | None, workload: str, batch: list[list[int]], concurrency: int,
        output_len: int, async_scheduling: bool = False, compute_bound_batch: int | None = None) -> dict:
    """One run to the end: output tokens/s, the speculation counts and the outputs.
    compute_bound_batch: the adaptive rule's (services/engine/spec_decode.py), if not its own."""
    runner.reset()
    scheduler = SchedulerConfig(max_num_seqs=concurrency, async_scheduling=async_scheduling)
    config = dataclasses.replace(runner.config, scheduler=scheduler, speculative=spec)
    engine = EngineCore(config, runner, runner.num_blocks)
    if compute_bound_batch is not None:
        engine.scheduler.spec.compute_bound_batch = compute_bound_batch
    for i, p in enumerate(batch):
        engine.add_request(engine.make_request(str(i), p, sampling(workload, output_len, i)))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    start = time.perf_counter()
    while engine.has_unfinished():
        for d in engine.step():
            outputs[d.req_id] += d.new_token_ids
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": sum(map(len, outputs.values())) / elapsed,
              "outputs": [outputs[str(i)] for i in range(len(batch))]}
    counts = engine.scheduler.spec
    if counts is not None:
        result["acceptance_rate"] = counts.num_accepted_tokens / max(1, counts.num_draft_tokens)
        result["mean_acceptance_length"] = 1 + counts.num_accepted_tokens / max(1, counts.num_drafts)
        result["drafts"] = counts.num_drafts
    return result


def repeat_rate(batch: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of output tokens whose bigram (previous token, token) occurred before in the request."""
    repeats = total = 0
    for prompt, out in zip(batch, outputs):
        seq = prompt + out
        seen = set(itertools.pairwise(prompt))
        for i in range(len(prompt), len(seq)):
            pair = (seq[i - 1], seq[i])
            repeats += pair in seen
            total += 1
            seen.add(pair)
    return repeats / max(1, total)


def measure(runners, specs: dict[str, SpeculativeConfig], workload: str, c: int, args, vocab: int) -> list[dict]:
    """Rows of one workload and concurrency: plain and every method, without and (with
    --async-scheduling) with async scheduling, interleaved, repeated. runners(method, async): the
    model runner for a method (None: plain decoding)."""
    batch = prompts(workload, max(4, 2 * c), args.input_len, vocab, seed=c)
    run(runners(None, False), None, workload, batch[:1], 1, 4)  # warm-up
    modes = (False, True) if args.async_scheduling else (False,)
    plain = {a: [] for a in modes}
    by_method = {(m, a): [] for a in modes for m in specs}
    for _ in range(args.repeats):
        for a in modes:
            plain[a].append(run(runners(None, a), None, workload, batch, c, args.output_len, a))
            for method, spec in specs.items():
                bound = int(method.partition("@")[2] or 0) or None  # METHOD@N: --compute-bound-batch N
                by_method[method, a].append(run(runners(method, a), spec, workload, batch, c, args.output_len, a, bound))
    rows = []
    for (method, a), results in by_method.items():
        best_plain = max(r["tokens_per_s"] for r in plain[a])
        best = max(results, key=lambda r: r["tokens_per_s"])
        row = {"workload": workload, "concurrency": c, "method": method, "async_scheduling": a,
               "plain_tokens_per_s": round(best_plain, 1), "spec_tokens_per_s": round(best["tokens_per_s"], 1),
               "ratio": round(best["tokens_per_s"] / best_plain, 3),
               "paired_ratio": round(statistics.median(
                   r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(results, plain[a])), 3),
               "acceptance_rate": round(best["acceptance_rate"], 3),
               "mean_acceptance_length": round(best["mean_acceptance_length"], 2), "drafts": best["drafts"],
               "output_repeat_rate": round(repeat_rate(batch, plain[False][0]["outputs"]), 3)}
        if a:
            row["vs_sync"] = round(best["tokens_per_s"] / max(r["tokens_per_s"] for r in by_method[method, False]), 3)
        rows.append(row)
    return rows


def spec_config(method: str, args, model_dir: Path) -> SpeculativeConfig:
    """draft_model drafts with the checkpoint's first --draft-layers layers (built once, cached
    beside it): random-weight models of different seeds would agree on nothing. eagle and eagle3
    draft with a random-weight head (pagedserve/test_eagle.py), cached beside it too; eagle with
    --eagle-head's instead, when given."""
    k = args.num_speculative_tokens
    if method == "eagle" and args.eagle_head is not None:
        draft = args.eagle_head
    elif method in ("eagle", "eagle3"):
        from pagedserve.test_eagle import make_eagle_head

        draft = args.cache_dir / f"{model_dir.name}-{method}-random-head"
        if not (draft / "config.json").is_file():
            make_eagle_head(model_dir, draft, method)
    elif method == "draft_model":
        from pagedserve.test_draft_model import make_draft_model

        draft = args.cache_dir / f"{model_dir.name}-draft-{args.draft_layers}-layers"
        if not (draft / "config.json").is_file():
            make_draft_model(model_dir, draft, args.draft_layers)
    else:
        return SpeculativeConfig(method=method, num_speculative_tokens=k)
    return SpeculativeConfig(method=method, num_speculative_tokens=k, model=str(draft), draft_cost=args.draft_cost)


def table(rows: list[dict]) -> str:
    head = ("workload", "C", "method", "async", "plain tok/s", "spec tok/s", "ratio", "paired", "accept", "mean len",
            "drafts", "repeats", "vs sync")
    keys = ("workload", "concurrency", "method", "async_scheduling", "plain_tokens_per_s", "spec_tokens_per_s", "ratio",
            "paired_ratio", "acceptance_rate", "mean_acceptance_length", "drafts", "output_repeat_rate", "vs_sync")
    head, keys = zip(*[(h, k) for h, k in zip(head, keys) if any(k in r for r in rows)])  # the columns rows have
    lines = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [list(head), *lines])


def add_workload_args(p: argparse.ArgumentParser, methods: tuple[str, ...], default_methods: list[str],
                      default_concurrency: list[int]) -> None:
    """The flags this benchmark and benchmarks/spec_parallel.py share: methods, concurrencies,
    workloads and their lengths, repeats, k, the draft's layers and cost, the checkpoint."""
    p.add_argument("--methods", nargs="+", default=default_methods, choices=methods)
    p.add_argument("--concurrency", type=int, nargs="+", default=default_concurrency)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=2, help="draft_model: the checkpoint's first N layers")
    p.add_argument("--draft-cost", type=float, default=None,
                   help="draft_model, eagle, eagle3: speculative_config's draft_cost (default: estimated; 0 drafts "
                        "whenever it pays off to verify, which measures what drafting costs)")
    p.add_argument("--eagle-head", type=Path, default=None,
                   help="eagle: draft with this EAGLE-1 head (e.g. one benchmarks/train_eagle.py trained for the "
                        "checkpoint) instead of a random-weight one")
    p.add_argument("--model", default=None, help="a checkpoint directory (default: the demo checkpoint)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, SPEC_METHODS, ["ngram", "suffix"], [1, 4, 16, 64])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="also run plain and every method with async scheduling, interleaved with the runs without")
    p.add_argument("--compute-bound-batch", type=int, nargs="+", default=None,
                   help="run each method with the adaptive rule's compute-bound batch at each N (rows METHOD@N) "
                        "instead of its own (services/engine/spec_decode.py COMPUTE_BOUND_BATCH)")
    args = p.parse_args(argv)
    import torch

    from services.worker.model_runner import ModelRunner

    model_dir = resolve_model(argparse.Namespace(model=args.model, arch="llama", demo_size="smol135", cache_dir=args.cache_dir))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_len = args.input_len + args.output_len + 8
    model = ModelConfig.from_pretrained(str(model_dir), max_model_len=max_len)
    plain = ModelRunner(EngineConfig(model, CacheConfig(kv_cache_memory=1 << 30)), device)
    specs = {m: spec_config(m, args, model_dir) for m in args.methods}
    if args.compute_bound_batch:
        specs = {f"{m}@{n}": spec for m, spec in specs.items() for n in args.compute_bound_batch}
    made: dict = {}

    def runners(method: str | None, async_scheduling: bool) -> ModelRunner:
        """Plain decoding and the engine's proposals run on the plain runner; a draft model, or
        proposals on the workers (async scheduling), on a runner of their own."""
        if method is None or (not specs[method].model_drafts and not async_scheduling):
            return plain
        if (method, async_scheduling) not in made:
            scheduler = SchedulerConfig(async_scheduling=async_scheduling)
            config = dataclasses.replace(plain.config, scheduler=scheduler, speculative=specs[method])
            made[method, async_scheduling] = ModelRunner(config, device)
        return made[method, async_scheduling]

    rows = []
    for workload in args.workloads:
        for c in args.concurrency:
            for row in measure(runners, specs, workload, c, args, model.vocab_size):
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    print(json.dumps({"device": device, "model": args.model or "smol135 (random weights)", "input_len": args.input_len,
                      "output_len": args.output_len, "repeats": args.repeats, "methods": args.methods,
                      "async_scheduling": args.async_scheduling, "rows": rows}))


if __name__ == "__main__":
    main()
