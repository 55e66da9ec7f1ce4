"""The CPU attention backend on one synthetic step, against its version at a git revision.

    python benchmarks/profile_attention.py --baseline-rev HEAD~1 [--rounds 5]

One step's attention for one layer (smol135's heads by default): a prefill step of fresh prompts
and a decode step over paged contexts, each timed with the working tree's TorchAttentionBackend
and with the one at --baseline-rev (loaded from `git show`), alternating A B A B for --rounds, so
both see the same machine load. Prints the median seconds of each and their ratio, then one JSON
object; the two outputs are also compared (max abs difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
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

from services.worker.layers.attention_backend import CommonAttentionMetadata

BACKEND_FILE = "services/worker/layers/attention_torch.py"


def backend_at(rev: str):
    """TorchAttentionBackend as it was at git revision rev."""
    source = subprocess.run(["git", "show", f"{rev}:{BACKEND_FILE}"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "attention_torch_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_torch_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.TorchAttentionBackend()


def make_step(q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int, head_dim: int, block: int):
    """(common metadata, q, k, v, kv cache) of one step; requests get consecutive blocks."""
    gen = torch.Generator().manual_seed(0)
    tables, slots, start = [], [], 1
    for q, c in zip(q_lens, ctx_lens):
        n = -(-(q + c) // block)
        tables.append(list(range(start, start + n)))
        slots += [tables[-1][p // block] * block + p % block for p in range(c, c + q)]
        start += n
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    common = CommonAttentionMetadata(qsl, [q + c for q, c in zip(q_lens, ctx_lens)], tables, torch.tensor(slots),
                                     sum(1 for q in q_lens if q == 1), block, torch.device("cpu"))
    t = qsl[-1]
    q = torch.randn(t, heads, head_dim, generator=gen)
    k, v = (torch.randn(t, kv_heads, head_dim, generator=gen) for _ in range(2))
    cache = torch.randn(2, start, block, kv_heads, head_dim, generator=gen)
    return common, q, k, v, cache


def time_step(backend, step, reps: int) -> tuple[float, torch.Tensor]:
    common, q, k, v, cache = step
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(reps):
            out = backend.forward(q, k, v, cache, backend.build(common), q.shape[-1] ** -0.5)
    return (time.perf_counter() - start) / reps, out


def main(argv: list[str] | None = None) -> None:
    from services.worker.layers.attention_torch import TorchAttentionBackend

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-rev", default="HEAD")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("H", "HKV", "D"))
    p.add_argument("--prompts", type=int, default=8, help="fresh prompts in the prefill step (256 tokens each)")
    p.add_argument("--decodes", type=int, default=48, help="decodes in the decode step (contexts 200..700)")
    args = p.parse_args(argv)
    h, hkv, d = args.heads
    steps = {
        "prefill": make_step([256] * args.prompts, [0] * args.prompts, h, hkv, d, 16),
        "decode": make_step([1] * args.decodes, [200 + 500 * i // args.decodes for i in range(args.decodes)][::-1],
                            h, hkv, d, 16),
    }
    backends = {"baseline": backend_at(args.baseline_rev), "current": TorchAttentionBackend()}
    times: dict[str, dict[str, list[float]]] = {s: {b: [] for b in backends} for s in steps}
    diffs = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            outs = {}
            for b, backend in backends.items():
                seconds, outs[b] = time_step(backend, step, args.reps)
                times[name][b].append(seconds)
            diffs[name] = float((outs["baseline"] - outs["current"]).abs().max())
    info = {"benchmark": "profile_attention", "baseline_rev": args.baseline_rev, "steps": {}}
    for name, runs in times.items():
        base, cur = statistics.median(runs["baseline"]), statistics.median(runs["current"])
        info["steps"][name] = {"baseline_s": round(base, 5), "current_s": round(cur, 5),
                               "speedup": round(base / cur, 3), "max_abs_diff": diffs[name]}
        print(f"{name:<8} baseline {1e3 * base:8.2f} ms  current {1e3 * cur:8.2f} ms  "
              f"speedup {base / cur:5.2f}x  (max |diff| {diffs[name]:.2e}, median of {args.rounds} alternating rounds)")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
