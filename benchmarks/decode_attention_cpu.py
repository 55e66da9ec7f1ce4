"""The CPU paged decode attention kernel (kernels/paged_decode_cpu.c) against its version at a git
revision, on one decode step of a smol135-shaped model.

    python benchmarks/decode_attention_cpu.py --baseline-rev HEAD~1 [--batch 16] [--context 256] [--query-len 1]

Both sources are compiled the same way (kernels/cpu_build.py) and called as their revision's
paged_decode_cpu.py called them: one call that threads itself, or (before kernels/cpu_pool.h)
the batch split over a Python thread pool, one ctypes call per slice. They alternate round by round;
every layer has its own cache, as in a real step, so the keys and values come from memory. Prints the median time
of each for all layers, their ratio, the bytes of cache read per second (with --query-len Q > 1, each
request's last Q tokens as query rows, a prompt chunk's: the GFLOP/s of its causal attention), and
the largest difference between their outputs, then one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# first: torch's OpenMP threads then sleep between ops, as in the engine (spinning, they took the
# cores from the kernel timed next)
import pagedserve  # noqa: F401

# isort: split
import torch

from kernels import cpu_build, paged_decode_cpu


def library_at(rev: str, folder: Path):
    """The kernel at `rev`, whether the caller splits the batch (its C function takes b_lo, b_hi),
    and whether it takes table_rows."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True).stdout

    for name in git("ls-tree", "--name-only", rev, "kernels/").decode().split():
        if name.endswith((".c", ".h")):  # its headers beside it, found before the current tree's
            (folder / Path(name).name).write_bytes(git("show", f"{rev}:{name}"))
    source = folder / "paged_decode_cpu.c"
    text = source.read_text()
    return cpu_build.load(source, f"paged decode kernel at {rev}"), "b_lo" in text, "table_rows" in text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256, help="tokens of context per request")
    parser.add_argument("--query-len", type=int, default=1, help="query rows per request (its last tokens)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    heads, kv_heads, dim, block = 9, 3, 64, 16  # smol135
    torch.manual_seed(0)
    blocks_per_seq = -(-args.context // block)
    caches = [torch.randn(2, args.batch * blocks_per_seq + 1, block, kv_heads, dim) for _ in range(args.layers)]
    table = (torch.randperm(args.batch * blocks_per_seq) + 1).view(args.batch, blocks_per_seq).long()
    table_rows = torch.arange(args.batch).repeat_interleave(args.query_len)
    seq_lens = (args.context - args.query_len + 1 + torch.arange(args.query_len)).repeat(args.batch)
    q = torch.randn(args.batch * args.query_len, heads, dim)
    threads = cpu_build.threads()
    pool = ThreadPoolExecutor(threads)
    # the scratch of a version whose caller split the batch, per slice (older ones kept every head's scores)
    scratch = torch.empty(args.batch, heads // kv_heads * args.context + 2 * dim)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    split_argtypes = [ptr] * 6 + [i64] * 7 + [f32, ptr, ptr, f32, f32]

    with tempfile.TemporaryDirectory() as tmp:
        libs = {"current": (paged_decode_cpu._library(), False, True),
                "baseline": library_at(args.baseline_rev, Path(tmp))}
        for lib, split, rows in libs.values():
            lib.paged_decode.argtypes = (split_argtypes if split else [ptr] * (7 if rows else 6) + [i64] * 6
                                         + [f32, i64, f32, f32, i64])

        def layer(name: str, cache: torch.Tensor, out: torch.Tensor) -> None:
            lib, split, rows = libs[name]
            assert rows or args.query_len == 1, "query rows need a kernel that takes table_rows"
            head = (q.data_ptr(), cache[0].data_ptr(), cache[1].data_ptr(), table.data_ptr(),
                    *((table_rows.data_ptr(),) if rows else ()), seq_lens.data_ptr(), out.data_ptr())
            if not split:
                lib.paged_decode(*head, q.shape[0], table.shape[1], heads, kv_heads, dim, block, dim**-0.5, 0, 1.0,
                                 1.0, threads)
                return
            parts = max(1, min(threads, args.batch))
            bounds = [args.batch * i // parts for i in range(parts + 1)]
            list(pool.map(lambda i: lib.paged_decode(*head, bounds[i], bounds[i + 1], table.shape[1], heads, kv_heads,
                                                     dim, block, dim**-0.5, scratch[bounds[i]].data_ptr(), None, 1.0,
                                                     1.0), range(parts)))

        def step(name: str) -> list[torch.Tensor]:
            outs = []
            for cache in caches:
                outs.append(torch.empty_like(q))
                layer(name, cache, outs[-1])
            return outs

        times: dict[str, list[float]] = {name: [] for name in libs}
        outs = {}
        for _ in range(args.rounds):
            for name in libs:
                start = time.perf_counter()
                outs[name] = step(name)
                times[name].append(time.perf_counter() - start)
    diff = max((a - b).abs().max().item() for a, b in zip(outs["current"], outs["baseline"]))
    cur, base = statistics.median(times["current"]), statistics.median(times["baseline"])
    if args.query_len == 1:
        amount, unit = 2 * args.layers * args.batch * args.context * kv_heads * dim * 4, "GB/s"
    else:
        amount, unit = 4 * args.layers * int(seq_lens.sum()) * heads * dim, "GFLOP/s"
    print(f"{args.layers} layers, {args.batch} requests x {args.context} tokens, {args.query_len} query rows each: "
          f"current {cur * 1e3:.1f} ms ({amount / cur / 1e9:.1f} {unit}), {args.baseline_rev} {base * 1e3:.1f} ms "
          f"({amount / base / 1e9:.1f} {unit}), ratio {base / cur:.2f}, max abs diff {diff:.1e}")
    print(json.dumps({"benchmark": "decode_attention_cpu", "baseline_rev": args.baseline_rev, "current_ms": cur * 1e3,
                      "baseline_ms": base * 1e3, "ratio": base / cur, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
