"""Speculative decoding (ngram) against plain decoding, on the same prompts in one invocation.

    python benchmarks/spec_decode.py [--concurrency 1 4 16 64] [--output-len 32] [--repeats 2]

Builds (or reuses) the random-weight smol135 checkpoint of benchmarks/throughput.py and drives the
offline engine core (the scheduler and model runner `LLM` uses) with at most C requests running,
for each concurrency C, 2*C prompts per run (at least 4). Plain and speculative runs alternate,
repeated, so machine noise hits both alike; each figure is the best of the repeats.

Workloads:
  random      prompts of random token ids;
  repetitive  a random 16-token span repeated to the prompt's length: the output loops (a
              random-weight smol135 falls into repeating its context), so prompt lookup finds
              the continuation, as when a prompt holds a text and asks for it back.
Reported per workload and concurrency: output tokens/s of each mode, the ratio, the acceptance rate
(accepted / proposed tokens) and the mean acceptance length (1 + accepted per verification).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import DEFAULT_CACHE, resolve_model
from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig


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


def run(runner, spec: SpeculativeConfig | None, batch: list[list[int]], concurrency: int, output_len: int) -> dict:
    """One run to the end: output tokens/s and the speculation counts."""
    runner.reset()
    config = dataclasses.replace(
        runner.config, scheduler=SchedulerConfig(max_num_seqs=concurrency), speculative=spec
    )
    engine = EngineCore(config, runner, runner.num_blocks)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, p in enumerate(batch):
        engine.add_request(engine.make_request(str(i), p, params))
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(d.new_token_ids) for d in engine.step())
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": tokens / elapsed}
    counts = engine.scheduler.spec
    if counts is not None:
        result["acceptance_rate"] = counts.num_accepted_tokens / max(1, counts.num_draft_tokens)
        result["mean_acceptance_length"] = 1 + counts.num_accepted_tokens / max(1, counts.num_drafts)
        result["drafts"] = counts.num_drafts
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--workloads", nargs="+", default=["random", "repetitive"], choices=["random", "repetitive"])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--model", default=None, help="a checkpoint directory (default: the smol135 demo checkpoint)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    import torch

    from services.worker.model_runner import ModelRunner

    model_dir = resolve_model(argparse.Namespace(model=args.model, arch="llama", demo_size="smol135", cache_dir=args.cache_dir))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_len = args.input_len + args.output_len + 8
    model = ModelConfig.from_pretrained(str(model_dir), max_model_len=max_len)
    runner = ModelRunner(EngineConfig(model, CacheConfig(kv_cache_memory=1 << 30)), device)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    rows = []
    for workload in args.workloads:
        for c in args.concurrency:
            batch = prompts(workload, max(4, 2 * c), args.input_len, model.vocab_size, seed=c)
            run(runner, None, batch[:1], 1, 4)  # warm-up
            plain, specs = [], []
            for _ in range(args.repeats):
                plain.append(run(runner, None, batch, c, args.output_len))
                specs.append(run(runner, spec, batch, c, args.output_len))
            best_plain = max(r["tokens_per_s"] for r in plain)
            best = max(specs, key=lambda r: r["tokens_per_s"])
            row = {"workload": workload, "concurrency": c, "plain_tokens_per_s": round(best_plain, 1),
                   "spec_tokens_per_s": round(best["tokens_per_s"], 1),
                   "ratio": round(best["tokens_per_s"] / best_plain, 3),
                   "acceptance_rate": round(best["acceptance_rate"], 3),
                   "mean_acceptance_length": round(best["mean_acceptance_length"], 2), "drafts": best["drafts"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"device": device, "model": args.model or "smol135 (random weights)", "input_len": args.input_len,
                      "output_len": args.output_len, "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
