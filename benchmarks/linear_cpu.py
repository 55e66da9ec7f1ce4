"""The float32 CPU linear kernel (kernels/f32_linear_cpu.py) against torch's F.linear.

    python benchmarks/linear_cpu.py [--rows 1 4 8 16 32 64] [--rounds 5]

Multiplies x [rows, K] by every linear weight of a smol135-shaped model (30 layers of q/k/v, o,
gate/up and down projections, 134 M parameters, so the weights come from memory as in decode),
with the kernel and with F.linear alternating round by round; prints the median time of each and
their ratio per row count, then one JSON object.
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

import torch
import torch.nn.functional as F

from kernels import f32_linear_cpu

# smol135: hidden 576, 9 heads and 3 KV heads of 64, intermediate 1536, 30 layers
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def timed(fn, weights: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    if not f32_linear_cpu.available():
        sys.exit("the CPU float32 linear kernel cannot be built here (no C compiler)")
    torch.manual_seed(0)
    weights = [torch.randn(*shape) / 24 for _ in range(args.layers) for shape in LAYER_SHAPES]
    results = {}
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in {s[1] for s in LAYER_SHAPES}}
            err = max((f32_linear_cpu.f32_linear(inputs[w.shape[1]], w) - F.linear(inputs[w.shape[1]], w)).abs().max().item()
                      for w in weights[: len(LAYER_SHAPES)])
            times: dict[str, list[float]] = {"kernel": [], "torch": []}
            for _ in range(args.rounds):
                times["kernel"].append(timed(f32_linear_cpu.f32_linear, weights, inputs))
                times["torch"].append(timed(F.linear, weights, inputs))
            k, t = statistics.median(times["kernel"]), statistics.median(times["torch"])
            results[rows] = {"kernel_ms": round(k * 1e3, 2), "torch_ms": round(t * 1e3, 2), "ratio": round(t / k, 3),
                             "max_abs_diff": err}
            print(f"rows {rows:3d}: kernel {k * 1e3:7.1f} ms  F.linear {t * 1e3:7.1f} ms  ratio {t / k:.2f}  "
                  f"(max abs diff {err:.1e})", flush=True)
    print(json.dumps({"benchmark": "linear_cpu", "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
