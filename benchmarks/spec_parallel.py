"""Speculative decoding over several worker ranks against plain decoding over the same ranks, on
the same prompts in one invocation.

    python benchmarks/spec_parallel.py [--tensor-parallel-size 1] [--pipeline-parallel-size 2] \\
        [--methods ngram draft_model] [--concurrency 1 4] [--output-len 32] [--repeats 2]

Each mode is an offline `LLM` over its own rank processes (gloo on CPU): plain decoding, then each
method; "draft_model-whole" is draft_model with draft_tensor_parallel_size 1 (the draft whole on
every tensor-parallel rank instead of sharded like the target). The modes alternate (plain, then
each method), repeated, so machine noise hits all alike; each figure is the best of the repeats.
For each concurrency C, one generate call of C prompts (all running together) of the workloads of
benchmarks/spec_decode.py (random: the control, sampled; repetitive: greedy output that loops).
Reported per workload, concurrency and method: output tokens/s of plain and speculative decoding,
their ratio, the acceptance rate, the mean acceptance length, the output's repeat rate, and
whether the outputs equal plain decoding's (greedy ones must); a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.checkpoints import resolve_model
from benchmarks.spec_decode import add_workload_args, prompts, repeat_rate, sampling, spec_config, table

METHODS = ("ngram", "suffix", "draft_model", "draft_model-whole")


def generate(llm, workload: str, batch: list[list[int]], output_len: int) -> dict:
    """One generate call: output tokens/s, the outputs and this call's speculation counts."""
    spec = llm.engine.scheduler.spec
    before = (spec.num_accepted_tokens, spec.num_draft_tokens, spec.num_drafts) if spec else (0, 0, 0)
    params = [sampling(workload, output_len, i) for i in range(len(batch))]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    result = {"tokens_per_s": sum(map(len, tokens)) / elapsed, "outputs": tokens}
    if spec is not None:
        accepted, drafted, drafts = (now - then for now, then in
                                     zip((spec.num_accepted_tokens, spec.num_draft_tokens, spec.num_drafts), before))
        result.update(acceptance_rate=accepted / max(1, drafted), mean_acceptance_length=1 + accepted / max(1, drafts),
                      drafts=drafts)
    return result


def measure(llms: dict, workload: str, c: int, args, vocab: int) -> list[dict]:
    """Rows of one workload and concurrency: plain and every method, interleaved, repeated."""
    batch = prompts(workload, c, args.input_len, vocab, seed=c)
    for llm in llms.values():  # warm-up
        generate(llm, workload, batch[:1], 4)
    runs: dict[str, list[dict]] = {mode: [] for mode in llms}
    for _ in range(args.repeats):
        for mode, llm in llms.items():
            runs[mode].append(generate(llm, workload, batch, args.output_len))
    plain = max(runs.pop("plain"), key=lambda r: r["tokens_per_s"])
    rows = []
    for method, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        rows.append({"workload": workload, "concurrency": c, "method": method,
                     "plain_tokens_per_s": round(plain["tokens_per_s"], 1),
                     "spec_tokens_per_s": round(best["tokens_per_s"], 1),
                     "ratio": round(best["tokens_per_s"] / plain["tokens_per_s"], 3),
                     "acceptance_rate": round(best["acceptance_rate"], 3),
                     "mean_acceptance_length": round(best["mean_acceptance_length"], 2), "drafts": best["drafts"],
                     "output_repeat_rate": round(repeat_rate(batch, plain["outputs"]), 3),
                     # greedy (repetitive) outputs must equal plain decoding's; sampled ones need not
                     "same_as_plain": all(r["outputs"] == plain["outputs"] for r in results)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=2)
    add_workload_args(p, METHODS, ["ngram", "draft_model"], [1, 4])
    p.add_argument("--demo-size", default="smol135", help="the demo checkpoint's size (smol135's 9 heads do not "
                   "split over 2 tensor-parallel ranks: use small, or --model)")
    args = p.parse_args(argv)
    from pagedserve import LLM

    model_dir = resolve_model(argparse.Namespace(model=args.model, arch="llama", demo_size=args.demo_size,
                                                 cache_dir=args.cache_dir))
    common = {"tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
              "max_model_len": args.input_len + args.output_len + 8, "kv_cache_memory": 1 << 30, "device": "cpu"}
    llms = {"plain": LLM(str(model_dir), **common)}
    for mode in args.methods:
        spec = spec_config(mode.removesuffix("-whole"), args, model_dir)
        if mode.endswith("-whole"):
            spec = dataclasses.replace(spec, draft_tensor_parallel_size=1)
        llms[mode] = LLM(str(model_dir), speculative_config=spec, **common)
    vocab = llms["plain"].config.model.vocab_size
    rows = []
    for workload in args.workloads:
        for c in args.concurrency:
            for row in measure(llms, workload, c, args, vocab):
                rows.append(row)
                print(json.dumps(row), flush=True)
    for llm in llms.values():
        llm.shutdown()
    print(table(rows))
    print(json.dumps({"model": args.model or f"{args.demo_size} (random weights)", **{k: common[k] for k in (
        "tensor_parallel_size", "pipeline_parallel_size")}, "input_len": args.input_len, "output_len": args.output_len,
        "repeats": args.repeats, "methods": args.methods, "rows": rows}))


if __name__ == "__main__":
    main()
