"""Quantization against float32, offline, in one run: weight memory, KV blocks for the same budget,
generated tokens/s, and output quality, per scheme.

    python benchmarks/quant.py                      # SmolLM2-135M's shapes (random weights, built once)
    python benchmarks/quant.py --model DIR --repeats 5

Schemes: float32 (the baseline), int8 weights (quantization="int8"), fp8 KV (kv_cache_dtype fp8
and fp8_e5m2), and pre-quantized copies of the model (written once beside it): compressed-tensors
W8A8 int8 and FP8 (dynamic per-token activations), GPTQ 4-bit (plain and act-order), GPTQ 8-bit and
AWQ 4-bit. On CPU the FP8, GPTQ and AWQ weights are dequantized at load, so their rows measure
quality, not memory or speed. Every scheme's LLM is loaded once; the timed rounds then alternate between them
(A, B, C, D, A, B, ...) --repeats times and report the median, so load on a shared machine hits
them alike. tokens/s is measured at concurrency 1 (one request decoding --output-len tokens) and at
--concurrency requests at once. Quality: top-1 agreement and mean |logprob difference| against
float32 over fixed prompts, teacher-forced through the prompt and greedy after it. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.checkpoints import DEFAULT_CACHE, resolve_model
from pagedserve import LLM, SamplingParams
from pagedserve.bench.quality import quality

SCHEMES = {
    "float32": {},
    "int8": {"quantization": "int8"},
    "fp8_kv": {"kv_cache_dtype": "fp8"},
    "fp8_e5m2_kv": {"kv_cache_dtype": "fp8_e5m2"},
}
# pre-quantized checkpoints: the float model written in each format (pagedserve/test_quant_model.py)
CHECKPOINT_SCHEMES = {
    "ct_w8a8": "compressed-tensors-w8a8",
    "ct_fp8": "compressed-tensors-fp8",
    "gptq_w4": "gptq",
    "gptq_w4_act_order": "gptq-act-order",
    "gptq_w8": "gptq-8bit",
    "awq_w4": "awq",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: a demo checkpoint)")
    p.add_argument("--demo-size", default="smol135", help="make_test_model size when --model is not given")
    p.add_argument("--arch", default="llama", help="make_test_model architecture when --model is not given")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where demo checkpoints are kept")
    names = [*SCHEMES, *CHECKPOINT_SCHEMES]
    p.add_argument("--schemes", nargs="+", default=names, choices=names)
    p.add_argument("--kv-cache-memory", type=int, default=64 << 20, help="the KV budget every scheme gets (bytes)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality-prompts", type=int, default=8)
    return p.parse_args(argv)


def _prompts(count: int, length: int, vocab: int, salt: int) -> list[dict]:
    return [{"prompt_token_ids": [(salt + 7919 * i + 104729 * j) % (vocab - 10) + 10 for j in range(length)]}
            for i in range(count)]


def _tokens_per_s(llm: LLM, prompts: list[dict], output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def _memory(llm: LLM, args: argparse.Namespace) -> dict:
    from services.worker.quant.methods import linear_weight_bytes

    runner = llm.runner
    per_seq = -(-(args.input_len + args.output_len) // llm.config.cache.block_size)
    return {
        "weight_bytes": sum(p.numel() * p.element_size() for p in runner.model.parameters()),
        "linear_weight_bytes": linear_weight_bytes(runner.model),
        "kv_blocks": runner.num_blocks,
        "max_concurrent_seqs": runner.num_blocks // per_seq,
    }


def _checkpoint(model: Path, name: str) -> tuple[str, dict]:
    """(model path, LLM keywords) of a scheme: a pre-quantized copy of the model is written once."""
    if name not in CHECKPOINT_SCHEMES:
        return str(model), SCHEMES[name]
    target = model.parent / f"{model.name}-{CHECKPOINT_SCHEMES[name]}"
    if not (target / "config.json").is_file():
        from pagedserve.test_quant_model import quantize_checkpoint

        print(f"writing {target} ...", file=sys.stderr)
        quantize_checkpoint(model, target, CHECKPOINT_SCHEMES[name])
    return str(target), {}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = resolve_model(args)
    schemes = ["float32", *[s for s in args.schemes if s != "float32"]]
    # max_model_len fits the workload and max_num_seqs is large, so the budget alone sizes the KV pool
    llms = {}
    for name in schemes:
        path, kwargs = _checkpoint(model, name)
        llms[name] = LLM(path, dtype="float32", kv_cache_memory=args.kv_cache_memory, max_num_seqs=1024,
                         max_model_len=args.input_len + max(args.output_len, 16), **kwargs)
    vocab = llms["float32"].config.model.vocab_size
    results = {name: _memory(llm, args) for name, llm in llms.items()}
    scored = SamplingParams(max_tokens=16, temperature=0, logprobs=1, prompt_logprobs=1)
    quality_prompts = _prompts(args.quality_prompts, args.input_len, vocab, salt=1)
    outputs = {name: llm.generate(quality_prompts, scored, use_tqdm=False) for name, llm in llms.items()}
    for name in schemes:
        agreement, mean_diff = quality(outputs["float32"], outputs[name])
        results[name].update(top1_agreement=round(agreement, 4), mean_abs_logprob_diff=round(mean_diff, 4))
    timings: dict[str, dict[str, list[float]]] = {name: {"c1": [], "cN": []} for name in schemes}
    one, many = _prompts(1, args.input_len, vocab, 2), _prompts(args.concurrency, args.input_len, vocab, 3)
    for name, llm in llms.items():  # warm-up: kernels built, caches touched
        _tokens_per_s(llm, one, 4)
    for _ in range(args.repeats):
        for name, llm in llms.items():
            timings[name]["c1"].append(_tokens_per_s(llm, one, args.output_len))
            timings[name]["cN"].append(_tokens_per_s(llm, many, args.output_len))
            gc.collect()
    base = results["float32"]
    for name in schemes:
        r = results[name]
        r["tokens_per_s_c1"] = round(statistics.median(timings[name]["c1"]), 2)
        r[f"tokens_per_s_c{args.concurrency}"] = round(statistics.median(timings[name]["cN"]), 2)
        r["vs_float32"] = {
            "linear_weight_memory": round(base["linear_weight_bytes"] / r["linear_weight_bytes"], 3),
            "kv_blocks": round(r["kv_blocks"] / base["kv_blocks"], 3),
            "tokens_per_s_c1": round(r["tokens_per_s_c1"] / base["tokens_per_s_c1"], 3),
            f"tokens_per_s_c{args.concurrency}": round(
                r[f"tokens_per_s_c{args.concurrency}"] / base[f"tokens_per_s_c{args.concurrency}"], 3),
        }
        print(f"{name:>12}: {json.dumps(r)}", flush=True)
    report = {"benchmark": "quant", "model": str(model), "repeats": args.repeats, "schemes": results}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
