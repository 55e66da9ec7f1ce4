"""Where a worker step's time goes: GEMMs, attention, norms, rotary, activations, sampling, Python.

    python benchmarks/profile_step.py --demo-size smol135 [--num-prompts 32] [--dtype float32]

Runs the throughput benchmark's workload (benchmarks/throughput.py) through `LLM.generate`, with
timing hooks on the model's leaf modules (every linear layer, attention, the norms, rotary, the
activation, the embedding and the LM head), on the sampler and on the step itself. Each step's
time is split by phase (prefill/mixed steps versus decode-only steps) into those categories plus
"forward other" (the forward's time outside the leaf modules: Python, views, residual glue) and
"step other" (the step outside the forward and sampling: input tensors, attention metadata,
results). "engine" is the rest of generate's wall time (scheduling, detokenizing). GEMMs also get
their achieved GFLOP/s, next to the float32 GEMM peak measured in the same run.

The hooks cost a few microseconds per module call, so the breakdown runs the model eagerly; the
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import checkpoints, throughput
from benchmarks.mfu import measure_gemm_peak

CATEGORIES = ("gemm", "attention", "norm", "rotary", "activation", "embedding", "lm_head", "sampling")


def module_category(module: Any) -> str | None:
    """The category a leaf module's time counts under (None: not timed on its own)."""
    from services.worker.layers import activation, attention, embedding, layernorm, linear, rotary

    if isinstance(module, embedding.ParallelLMHead):
        return "lm_head"
    kinds = (
        (linear._Linear, "gemm"),
        (attention.Attention, "attention"),
        ((layernorm.RMSNorm, layernorm.LayerNorm), "norm"),
        (rotary.RotaryEmbedding, "rotary"),
        ((activation.SiluAndMul, activation.GeluAndMul), "activation"),
        (embedding.VocabParallelEmbedding, "embedding"),
    )
    return next((name for kind, name in kinds if isinstance(module, kind)), None)


class StepProfiler:
    """Accumulates seconds per (phase, category) over the steps of a generate call."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.steps: dict[str, int] = defaultdict(int)
        self.gemm_flops: dict[str, float] = defaultdict(float)
        self._flops = 0.0

    def hook(self, module: Any, category: str) -> None:
        starts: list[float] = []

        def pre(_module, args) -> None:
            starts.append(time.perf_counter())

        def post(_module, args, output) -> None:
            self.current[category] += time.perf_counter() - starts.pop()
            if category in ("gemm", "lm_head"):
                x, w = args[0], module.weight
                self._flops += 2.0 * x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def timed(self, fn, category: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[category] += time.perf_counter() - start

        return wrapper

    def end_step(self, phase: str) -> None:
        bucket = self.phases[phase]
        for name, seconds in self.current.items():
            bucket[name] += seconds
        self.gemm_flops[phase] += self._flops
        self.steps[phase] += 1
        self.current, self._flops = defaultdict(float), 0.0


def instrument(llm: Any, prof: StepProfiler) -> None:
    """Hook the model's leaf modules, its whole forward, the sampler and the runner's step."""
    runner = llm.runner
    for module in runner.model.modules():
        category = module_category(module)
        if category is not None:
            prof.hook(module, category)
    prof.hook(runner.model, "forward")
    runner.outputs.sampler = prof.timed(runner.outputs.sampler, "sampling")
    execute = runner.execute

    def step(plan):
        start = time.perf_counter()
        result = execute(plan)
        prof.current["step"] += time.perf_counter() - start
        stats = runner.last_stats
        prof.end_step(stats.phase if stats is not None else "empty")
        return result

    runner.execute = step


def breakdown(bucket: dict[str, float]) -> dict[str, float]:
    """Exclusive seconds per category, with the forward's and the step's remainders."""
    out = {name: bucket.get(name, 0.0) for name in CATEGORIES}
    inside = sum(out[name] for name in CATEGORIES if name not in ("lm_head", "sampling"))
    out["forward other"] = bucket.get("forward", 0.0) - inside
    out["step other"] = bucket.get("step", 0.0) - bucket.get("forward", 0.0) - out["lm_head"] - out["sampling"]
    return out


def report(prof: StepProfiler, wall_s: float, peak: float) -> dict[str, Any]:
    phases = {}
    for phase, bucket in sorted(prof.phases.items()):
        parts = breakdown(bucket)
        gemm_s = parts["gemm"] + parts["lm_head"]
        phases[phase] = {
            "steps": prof.steps[phase],
            "step_s": round(bucket.get("step", 0.0), 4),
            "seconds": {k: round(v, 4) for k, v in parts.items()},
            "gemm_gflops": round(prof.gemm_flops[phase] / max(gemm_s, 1e-9) / 1e9, 2),
        }
    steps_s = sum(b.get("step", 0.0) for b in prof.phases.values())
    return {"benchmark": "profile_step", "wall_s": round(wall_s, 4), "engine_s": round(wall_s - steps_s, 4),
            "gemm_peak_gflops": round(peak, 2), "phases": phases}


def print_report(info: dict[str, Any]) -> None:
    print(f"generate wall {info['wall_s']:.2f}s; outside the worker step (engine): {info['engine_s']:.2f}s; "
          f"float32 GEMM peak {info['gemm_peak_gflops']:.1f} GFLOP/s")
    for phase, data in info["phases"].items():
        total = max(data["step_s"], 1e-9)
        print(f"\n{phase}: {data['steps']} steps, {data['step_s']:.2f}s; "
              f"GEMMs at {data['gemm_gflops']:.1f} GFLOP/s ({100 * data['gemm_gflops'] / info['gemm_peak_gflops']:.0f}% of peak)")
        for name, seconds in sorted(data["seconds"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<14}{seconds:>9.3f}s {100 * seconds / total:>6.1f}%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--demo-size", default="smol135")
    p.add_argument("--arch", default="llama")
    p.add_argument("--cache-dir", type=Path, default=checkpoints.DEFAULT_CACHE)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 512))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=throughput._cpu_count())
    p.add_argument("--gemm-size", type=int, default=2048)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    from pagedserve.llm import LLM
    from shared.sampling_params import SamplingParams

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = checkpoints.resolve_model(args)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    peak = measure_gemm_peak(args.gemm_size, 5)
    reqs = throughput.make_workload(args, vocab, args.num_prompts, args.seed)
    llm = LLM(str(model_dir), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    warm = throughput.make_workload(args, vocab, 2, args.seed + 1)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.output_len) for r in reqs]
    llm.generate([{"prompt_token_ids": r.prompt[:32]} for r in warm], SamplingParams(max_tokens=4), use_tqdm=False)
    prof = StepProfiler()
    instrument(llm, prof)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], params, use_tqdm=False)
    info = report(prof, time.perf_counter() - start, peak)
    print_report(info)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
