"""The CPU linear kernels (kernels/f32_linear_cpu.py, kernels/int8_linear_cpu.py) against torch.

    python benchmarks/linear_cpu.py [--rows 1 2 4 8 16 32 64] [--rounds 5] [--int8]

Multiplies x [rows, K] by every linear weight of a smol135-shaped model (30 layers of q/k/v, o,
gate/up and down projections, 134 M parameters, so the weights come from memory as in decode),
with the float32 kernel, with F.linear and with oneDNN's matmul (where torch has it), and with --int8 also with the int8 kernel (W8A16,
per-row scales) and the path past its MAX_ROWS (dequantize, then F.linear), the paths alternating
round by round; prints the median time of each and the ratios per row count, then one JSON object.
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
import torch.nn.functional as F

from kernels import f32_linear_cpu, int8_linear_cpu
from services.worker.quant.int8 import quantize_per_channel

# smol135: hidden 576, 9 heads and 3 KV heads of 64, intermediate 1536, 30 layers
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _paths(int8: bool) -> dict:
    """name -> fn(x, weight index) over float32 weights `w` and int8 (weight, scale) pairs `q`."""
    paths = {"kernel": lambda x, w, q: f32_linear_cpu.f32_linear(x, w),
             "torch": lambda x, w, q: F.linear(x, w)}
    if f32_linear_cpu._onednn():  # what f32_linear_cpu.linear runs past the kernel's MAX_ROWS
        paths["onednn"] = lambda x, w, q: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    if int8:
        paths["int8"] = lambda x, w, q: int8_linear_cpu.int8_linear(x, *q, None)
        paths["int8_torch"] = lambda x, w, q: F.linear(x, int8_linear_cpu.dequantize(*q))
    return paths


def timed(fn, weights: list[torch.Tensor], quantized: list, inputs: dict[int, torch.Tensor]) -> float:
    start = time.perf_counter()
    for w, q in zip(weights, quantized):
        fn(inputs[w.shape[1]], w, q)
    return time.perf_counter() - start


def _max_diff(fn, ref, weights: list[torch.Tensor], quantized: list, inputs: dict[int, torch.Tensor]) -> float:
    return max((fn(inputs[w.shape[1]], w, q) - ref(inputs[w.shape[1]], w, q)).abs().max().item()
               for w, q in zip(weights[: len(LAYER_SHAPES)], quantized))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--int8", action="store_true", help="also the int8 kernel and the dequantized F.linear")
    args = parser.parse_args()
    if not (f32_linear_cpu.available() and int8_linear_cpu.available()):
        sys.exit("the CPU linear kernels cannot be built here (no C compiler)")
    torch.manual_seed(0)
    weights = [torch.randn(*shape) / 24 for _ in range(args.layers) for shape in LAYER_SHAPES]
    quantized = [quantize_per_channel(w) if args.int8 else None for w in weights]
    paths = _paths(args.int8)
    results = {}
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in {s[1] for s in LAYER_SHAPES}}
            errors = {"kernel": _max_diff(paths["kernel"], paths["torch"], weights, quantized, inputs)}
            if args.int8:
                errors["int8"] = _max_diff(paths["int8"], paths["int8_torch"], weights, quantized, inputs)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    times[name].append(timed(fn, weights, quantized, inputs))
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            result = {f"{name}_ms": round(v, 2) for name, v in ms.items()}
            result["ratio"] = round(ms["torch"] / ms["kernel"], 3)  # F.linear time / kernel time
            line = f"rows {rows:3d}: kernel {ms['kernel']:7.1f} ms  F.linear {ms['torch']:7.1f} ms  ratio {result['ratio']:.2f}"
            if "onednn" in ms:
                result["onednn_ratio"] = round(ms["onednn"] / ms["kernel"], 3)  # oneDNN time / kernel time
                line += f"  oneDNN {ms['onednn']:7.1f} ms  ratio {result['onednn_ratio']:.2f}"
            if args.int8:
                result["int8_vs_kernel"] = round(ms["kernel"] / ms["int8"], 3)
                result["int8_vs_int8_torch"] = round(ms["int8_torch"] / ms["int8"], 3)
                line += (f"  | int8 {ms['int8']:7.1f} ms ({result['int8_vs_kernel']:.2f}x kernel)  dequantized F.linear "
                         f"{ms['int8_torch']:7.1f} ms ({result['int8_vs_int8_torch']:.2f}x)")
            result["max_abs_diff"] = max(errors.values())  # each kernel against its torch path
            results[rows] = result
            print(line + f"  (max abs diff {max(errors.values()):.1e})", flush=True)
    print(json.dumps({"benchmark": "linear_cpu", "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
