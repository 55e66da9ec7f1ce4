"""The C row ops (kernels/rows_cpu.py) against the torch ops they replace, on one prefill step's
tensors of a smol135-shaped layer.

    python benchmarks/rows_cpu.py [--tokens 2048] [--rounds 5]

RMSNorm with the residual add, rotary over q and k (views of one fused projection) and
SiLU-and-mul, each timed for all layers of a step with torch and with the C op, alternating round
by round, beside the layer's GEMMs (oneDNN's, as the linear layers run them) for scale. Prints the
medians and ratios, then one JSON object.
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

from kernels import f32_linear_cpu, rows_cpu
from services.worker.layers.rotary import RotaryEmbedding

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 576, 9, 3, 64, 1536, 30  # smol135


def ops(tokens: int) -> dict[str, dict]:
    """For each op: (the torch version, the C version), as calls over this step's tensors."""
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(tokens, HIDDEN, generator=gen) for _ in range(2))
    weight = torch.ones(HIDDEN)
    rope = RotaryEmbedding(HEAD_DIM, 4096, {"rope_theta": 10000.0, "rope_type": "default"})
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    positions = torch.arange(tokens) % 4096
    gate_up = torch.randn(tokens, 2 * INTER, generator=gen)

    def torch_rotary():
        cos, sin = rope.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)

    def torch_silu():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    table = rope.cos_sin_cache
    return {
        "rms_norm (x2)": (lambda: [F.rms_norm(x + residual, (HIDDEN,), weight, 1e-5) for _ in range(2)],
                          lambda: [rows_cpu.rms_norm(x, weight, 1e-5, residual) for _ in range(2)]),
        "rotary": (torch_rotary, lambda: (rows_cpu.rotary(positions, q, HEAD_DIM, table),
                                          rows_cpu.rotary(positions, k, HEAD_DIM, table))),
        "silu_and_mul": (torch_silu, lambda: rows_cpu.silu_and_mul(gate_up)),
    }


def gemms(tokens: int):
    """The layer's four projections, as its linear layers run them."""
    gen = torch.Generator().manual_seed(1)
    shapes = [((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN),
              (HIDDEN, INTER)]
    weights = [torch.randn(n, kk, generator=gen) for n, kk in shapes]
    inputs = [torch.randn(tokens, kk, generator=gen) for _, kk in shapes]
    return lambda: [f32_linear_cpu.linear(a, w) for a, w in zip(inputs, weights)]


def seconds(fn, layers: int) -> float:
    start = time.perf_counter()
    for _ in range(layers):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if rows_cpu._library() is None:
        sys.exit("no C compiler: the C row ops are not built")
    with torch.inference_mode():
        table = ops(args.tokens)
        gemm = gemms(args.tokens)
        times = {name: ([], []) for name in table}
        gemm_times = []
        for _ in range(args.rounds):
            for name, (torch_fn, c_fn) in table.items():
                times[name][0].append(seconds(torch_fn, LAYERS))
                times[name][1].append(seconds(c_fn, LAYERS))
            gemm_times.append(seconds(gemm, LAYERS))
    result = {"benchmark": "rows_cpu", "tokens": args.tokens, "layers": LAYERS,
              "gemm_s": statistics.median(gemm_times), "ops": {}}
    print(f"{args.tokens} tokens x {LAYERS} layers; the layers' GEMMs: {result['gemm_s'] * 1e3:.0f} ms")
    for name, (t, c) in times.items():
        t, c = statistics.median(t), statistics.median(c)
        result["ops"][name] = {"torch_s": t, "c_s": c, "ratio": t / c}
        print(f"{name:<14} torch {t * 1e3:8.1f} ms   C {c * 1e3:7.1f} ms   {t / c:5.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
