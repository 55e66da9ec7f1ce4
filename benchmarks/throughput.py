"""Offline throughput: pagedserve's LLM.generate against transformers' generate, in one invocation.

    python benchmarks/throughput.py --model DIR
    python benchmarks/throughput.py --demo-size smol135 --arch llama   # builds a random-weight checkpoint

The workload is N prompts of random token ids with random input and output lengths, decoded greedily
with EOS ignored, so every request produces exactly its requested number of tokens. The baseline is
`AutoModelForCausalLM.generate` on the first K prompts in static, length-sorted, left-padded batches.
Both runs report generated and total tokens/s and model FLOPs utilization (MFU) against this
machine's measured float32 GEMM peak. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.checkpoints import DEFAULT_CACHE, resolve_model
from benchmarks.hf_baseline import run_hf
from benchmarks.mfu import count_parameters, measure_gemm_peak, mfu
from pagedserve.bench.datasets import SampleRequest, uniform_requests
from pagedserve.bench.offline import Timing, generate


@dataclass(frozen=True)
class RunResult:
    prompts: int
    prompt_tokens: int
    requested_tokens: int
    generated_tokens: int
    elapsed_s: float
    cpu_s: float
    outputs: list[list[int]]

    @classmethod
    def of(cls, reqs: list[SampleRequest], outputs: list[list[int]], t: Timing) -> RunResult:
        prompt_tokens = sum(r.prompt_len for r in reqs)
        requested = sum(r.output_len for r in reqs)
        return cls(len(reqs), prompt_tokens, requested, sum(map(len, outputs)), t.wall_s, t.cpu_s, outputs)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    def summary(self, params: int, peak_gflops: float) -> dict[str, Any]:
        elapsed = max(self.elapsed_s, 1e-9)
        return {
            "prompts": self.prompts,
            "prompt_tokens": self.prompt_tokens,
            "requested_output_tokens": self.requested_tokens,
            "generated_tokens": self.generated_tokens,
            "total_tokens": self.total_tokens,
            "elapsed_s": round(self.elapsed_s, 4),
            "cpu_s": round(self.cpu_s, 3),
            "generated_tok_s": round(self.generated_tokens / elapsed, 3),
            "total_tok_s": round(self.total_tokens / elapsed, 3),
            "mfu": round(mfu(params, self.total_tokens, elapsed, peak_gflops), 6),
        }


# ----- arguments --------------------------------------------------------------------------------


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (or hub id); default: build --demo-size")
    p.add_argument("--demo-size", default="smol135", help="make_test_model size when --model is not given")
    p.add_argument("--arch", default="llama", help="make_test_model architecture when --model is not given")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where demo checkpoints are kept")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--compare-dtype", choices=("float32", "float16", "bfloat16"),
                   help="also run pagedserve in this dtype, alternating with --dtype, and report its speed ratio and "
                   "top-1 agreement with --dtype's greedy tokens")
    p.add_argument("--compare-rounds", type=int, default=1, help="alternating runs of each dtype (best kept)")
    p.add_argument("--agreement-prompts", type=int, default=8, help="prompts scored for top-1 agreement")
    p.add_argument("--hf-prompts", type=int, default=8, help="baseline runs on the first K prompts only")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--threads", type=int, default=_cpu_count(), help="torch.set_num_threads")
    p.add_argument("--gemm-size", type=int, default=2048, help="square GEMM size for the peak measurement")
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--gemm-device", default="cpu", choices=("cpu", "cuda"),
                   help="where the GEMM peak (the MFU denominator) is measured; cuda uses --dtype")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    for name in ("num_prompts", "threads", "gemm_size", "gemm_reps", "hf_batch_size", "compare_rounds", "agreement_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hf_prompts < 0:
        p.error("--hf-prompts must be non-negative")
    if args.gemm_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--gemm-device cuda needs a CUDA GPU")


# ----- model and workload -----------------------------------------------------------------------


def make_workload(args: argparse.Namespace, vocab_size: int, num: int, seed: int) -> list[SampleRequest]:
    """`num` requests with random ids and lengths drawn uniformly from --input-len and --output-len."""
    return uniform_requests(num, tuple(args.input_len), tuple(args.output_len), vocab_size, seed)


# ----- measurements -----------------------------------------------------------------------------


def make_llm(args: argparse.Namespace, model_dir: Path, dtype: str):
    from pagedserve.llm import LLM

    return LLM(
        str(model_dir),
        dtype=dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )


def run_pagedserve(llm, reqs: list[SampleRequest], warm: list[SampleRequest]) -> RunResult:
    """Time greedy LLM.generate on every request (pagedserve bench throughput's timed run), after a
    short warm-up."""
    generate(llm, warm, greedy=True)
    results, t = generate(llm, reqs, greedy=True)
    return RunResult.of(reqs, [list(res.outputs[0].token_ids) for res in results], t)


def top1_agreement(llm, reqs: list[SampleRequest], outputs: list[list[int]]) -> float:
    """Share of generated positions where llm's top-1 token is the one another run chose greedily,
    each position scored on that run's own prefix (teacher forcing, through prompt_logprobs)."""
    from shared.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt + out} for r, out in zip(reqs, outputs)]
    results = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    agree = total = 0
    for r, out, res in zip(reqs, outputs, results):
        for pos, token in enumerate(out, start=len(r.prompt)):
            agree += res.prompt_logprobs[pos][token].rank == 1
            total += 1
    return agree / max(total, 1)


def compare_dtypes(args, model_dir: Path, reqs: list[SampleRequest], warm: list[SampleRequest], params: int, peak: float) -> dict:
    """args.dtype against args.compare_dtype, alternating runs (A B A B ...), best of each, and the
    compared dtype's top-1 agreement with args.dtype's greedy tokens."""
    import torch

    llms = {d: make_llm(args, model_dir, d) for d in (args.dtype, args.compare_dtype)}
    best: dict[str, RunResult] = {}
    for _ in range(args.compare_rounds):
        for dtype, llm in llms.items():
            run = run_pagedserve(llm, reqs, warm)
            if dtype not in best or run.elapsed_s < best[dtype].elapsed_s:
                best[dtype] = run
    a, b = best[args.dtype], best[args.compare_dtype]
    k = min(args.agreement_prompts, len(reqs))
    return {
        args.dtype: a.summary(params, peak),
        args.compare_dtype: b.summary(params, peak),
        "total_tok_s_ratio": round(a.elapsed_s / max(b.elapsed_s, 1e-9), 4),  # compared / base
        "top1_agreement": round(top1_agreement(llms[args.compare_dtype], reqs[:k], a.outputs[:k]), 5),
        "agreement_prompts": k,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


# ----- report -----------------------------------------------------------------------------------


_COLUMNS = (  # header, width, cell
    ("prompts", 8, lambda s: f"{s['prompts']}"),
    ("prompt", 9, lambda s: f"{s['prompt_tokens']}"),
    ("gen", 8, lambda s: f"{s['generated_tokens']}"),
    ("secs", 9, lambda s: f"{s['elapsed_s']:.2f}"),
    ("gen tok/s", 11, lambda s: f"{s['generated_tok_s']:.1f}"),
    ("total tok/s", 12, lambda s: f"{s['total_tok_s']:.1f}"),
    ("MFU", 8, lambda s: f"{100 * s['mfu']:.2f}%"),
    ("cpu/wall", 9, lambda s: f"{s['cpu_s'] / max(s['elapsed_s'], 1e-9):.2f}"),
)


def _line(name: str, cells: list[str]) -> str:
    return f"{name:<13}" + "".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS))


def print_table(info: dict[str, Any]) -> None:
    settings = info["settings"]
    print(
        f"model {info['model']}  ({info['params'] / 1e6:.1f}M params, {settings['dtype']}, {settings['threads']} threads)"
    )
    where = "float32" if settings["gemm_device"] == "cpu" else f"{settings['dtype']} CUDA"
    print(f"{where} GEMM peak ({settings['gemm_size']}^3): {info['gemm_peak_gflops']:.1f} GFLOP/s")
    header = _line("engine", [h for h, _, _ in _COLUMNS])
    print(header + "\n" + "-" * len(header))
    for name, key in (("pagedserve", "pagedserve"), ("transformers", "hf")):
        if info[key] is not None:
            print(_line(name, [cell(info[key]) for _, _, cell in _COLUMNS]))
    if "dtypes" in info:
        d, base, other = info["dtypes"], settings["dtype"], settings["compare_dtype"]
        print(
            f"{other} / {base}: {d['total_tok_s_ratio']:.2f}x total tok/s ({d[base]['total_tok_s']:.1f} vs "
            f"{d[other]['total_tok_s']:.1f}), top-1 agreement {100 * d['top1_agreement']:.2f}% over "
            f"{d['agreement_prompts']} prompts (CPU {d['cpu_capability']}, native bf16: {d['native_bf16']})"
        )
    if info["hf"] is not None:
        print(
            f"pagedserve / transformers generated tok/s: {info['ratio']:.2f}x  "
            f"(greedy outputs identical on {info['hf_matching_outputs']}/{info['hf']['prompts']} prompts)"
        )


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args)
    config = json.loads((model_dir / "config.json").read_text())
    params = count_parameters(model_dir)
    gemm_dtype = "float32" if args.gemm_device == "cpu" else args.dtype
    peak = measure_gemm_peak(args.gemm_size, args.gemm_reps, device=args.gemm_device, dtype=gemm_dtype)
    reqs = make_workload(args, config["vocab_size"], args.num_prompts, args.seed)
    warm = make_workload(args, config["vocab_size"], 2, args.seed + 1)  # distinct ids: no prefix-cache hits
    warm = [SampleRequest(r.prompt[: args.input_len[0]], args.input_len[0], min(4, r.output_len)) for r in warm]
    ours = run_pagedserve(make_llm(args, model_dir, args.dtype), reqs, warm)
    if ours.generated_tokens != ours.requested_tokens:
        msg = f"warning: pagedserve generated {ours.generated_tokens} tokens of {ours.requested_tokens} requested"
        print(msg, file=sys.stderr)
    hf_reqs = reqs[: args.hf_prompts]
    theirs = None if args.skip_hf or not hf_reqs else RunResult.of(hf_reqs, *run_hf(args, model_dir, hf_reqs, warm))
    info: dict[str, Any] = {
        "benchmark": "throughput",
        "model": str(model_dir),
        "architecture": (config.get("architectures") or ["?"])[0],
        "params": params,
        "gemm_peak_gflops": round(peak, 2),
        "pagedserve": ours.summary(params, peak),
        "hf": None if theirs is None else theirs.summary(params, peak),
        "ratio": None,
        "hf_matching_outputs": None,
        "settings": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(args).items()
            if k not in ("cache_dir",)
        },
    }
    if args.compare_dtype:
        info["dtypes"] = compare_dtypes(args, model_dir, reqs, warm, params, peak)
    if theirs is not None:
        info["ratio"] = round(info["pagedserve"]["generated_tok_s"] / info["hf"]["generated_tok_s"], 4)
        info["hf_matching_outputs"] = sum(a == b for a, b in zip(ours.outputs, theirs.outputs))
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = benchmark(args)
    print_table(info)
    print(json.dumps(info, default=str))


if __name__ == "__main__":
    main()
