"""Multi-LoRA offline throughput: the same batch with no adapter, with one adapter for every
request, and with four adapters mixed (request i runs adapter i % 4), as ratios to the base model.

    python benchmarks/lora.py                       # a random-weight "small" llama, adapters of rank 16
    python benchmarks/lora.py --model DIR --adapters A B C D

One LLM (enable_lora, max_loras 4) runs every configuration, interleaved and repeated
(--repeats), after a warm-up that loads the adapters; each figure is the median. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from pagedserve import LLM, LoRARequest
from pagedserve.bench.datasets import uniform_requests
from pagedserve.bench.offline import generate
from pagedserve.test_lora import make_test_adapter
from pagedserve.test_model import make_test_model

MIXES = {"base": 0, "1 adapter": 1, "4 adapters": 4}


def _setup(args: argparse.Namespace, tmp: Path) -> tuple[str, list[str]]:
    model = args.model or str(make_test_model(tmp / "model", args.arch, args.size))
    adapters = args.adapters or [str(make_test_adapter(model, tmp / f"adapter-{i}", args.rank, seed=i))
                                 for i in range(4)]
    if len(adapters) != 4:
        raise SystemExit("--adapters takes four adapter folders")
    return model, adapters


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = _setup(args, Path(tmp))
        llm = LLM(model, enable_lora=True, max_loras=4, max_lora_rank=max(args.rank, 16),
                  max_num_seqs=args.num_prompts, kv_cache_memory=1 << 30)
        loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
        requests = uniform_requests(args.num_prompts, (args.input_len, args.input_len),
                                    (args.output_len, args.output_len), llm.config.model.vocab_size, seed=0)
        choice = {n: [None] * len(requests) if n == 0 else [loras[i % n] for i in range(len(requests))]
                  for n in MIXES.values()}
        generate(llm, requests[:8], lora_request=choice[4][:8])  # warm-up: every adapter loaded
        rates: dict[str, list[float]] = {name: [] for name in MIXES}
        for _ in range(args.repeats):
            for name, n in MIXES.items():
                outs, t = generate(llm, requests, lora_request=choice[n])
                rates[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / t.wall_s)
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "model": args.model or f"{args.arch}-{args.size} (random weights)", "rank": args.rank,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "repeats": args.repeats, "output_tokens_per_s": median,
        "ratio_to_base": {name: median[name] / median["base"] for name in MIXES},
        "all_runs": rates,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint directory (default: a random-weight one)")
    p.add_argument("--adapters", nargs="+", default=None, help="four PEFT adapter folders for --model")
    p.add_argument("--arch", default="llama")
    p.add_argument("--size", default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    result = run(p.parse_args())
    for name, ratio in result["ratio_to_base"].items():
        print(f"{name:>11}: {result['output_tokens_per_s'][name]:8.1f} output tok/s  {ratio:.3f}x base")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
