"""Random sampling of one step's rows: the sampler's inverse-CDF draw against an exponential race.

    python benchmarks/sampler_cpu.py [--rows 64] [--vocab 49152] [--rounds 7]

Both draw one token per row from the same softmax probabilities (temperature 1, smol135's
vocabulary by default): `random_sample` (services/worker/layers/sampler.py: one uniform per row
placed on the row's cumulative sums) and the exponential race it replaced (argmax of p / q, one
q ~ Exp(1) per vocabulary entry, drawn by torch's exponential_). They alternate round by round;
prints the median milliseconds of each and their ratio, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# first: torch's OpenMP threads then sleep between ops, as in the engine (spinning, they took the
# cores from the kernel timed next)
import pagedserve  # noqa: F401

# isort: split
import torch

from services.worker.layers.sampler import random_sample


def exponential_race(probs: torch.Tensor) -> torch.Tensor:
    q = torch.empty_like(probs).exponential_()
    return (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    probs = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    samplers = {"inverse_cdf": lambda: random_sample(probs, {}), "exponential_race": lambda: exponential_race(probs)}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in samplers.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratio = ms["exponential_race"] / ms["inverse_cdf"]
    print(f"{args.rows} rows x {args.vocab}: inverse CDF {ms['inverse_cdf']:.2f} ms, exponential race "
          f"{ms['exponential_race']:.2f} ms ({ratio:.0f}x)")
    print(json.dumps({"benchmark": "sampler_cpu", "rows": args.rows, "vocab": args.vocab, "ms": ms, "ratio": ratio}))


if __name__ == "__main__":
    main()
