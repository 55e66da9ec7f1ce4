"""GPU benchmarks for the Triton kernels, as ratios against a baseline run in the same process.

Decode attention (default mode): achieved bandwidth of paged_attention_decode (bytes of K/V and
q read / kernel time) over a grid of batch sizes and context lengths, next to the vectorized
torch reference timed the same way (CUDA events, warmup, L2 flushed before every timed call).

    python benchmarks/gpu_kernels.py [--batch-sizes 1,8,32,128] [--context-lens 512,2048,8192]
    python benchmarks/gpu_kernels.py --e2e MODEL_DIR [--max-tokens 256] [--enforce-eager]

--e2e measures batch-1 decode tokens/s through the offline API (`pagedserve.LLM`) and compares it
with the memory-bandwidth roofline (every weight byte read once per token). Decode steps replay
the worker's CUDA graphs as in serving; --enforce-eager runs them eagerly instead, so two runs
show what the graphs are worth. Both modes print a table and then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}  # HBM3e / HBM3 (SXM); pass --peak-gbps for others
SAFETENSORS_ELEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _require_cuda():
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks/gpu_kernels.py needs torch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure")
    return torch


def default_peak_gbps(device_name: str) -> float | None:
    for key, gbps in PEAK_GBPS.items():
        if key in device_name:
            return gbps
    return None


def time_ms(torch, fn: Callable[[], Any], iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn over iters calls, each timed alone by CUDA events after an L2
    flush, so small working sets are read from HBM as they would be inside a model step."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _decode_case(torch, args, batch: int, context: int) -> dict[str, Any] | None:
    from kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref

    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
    if kv_bytes > args.max_kv_gb * 1e9:
        return None
    blocks_per_seq = -(-context // args.block_size)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, args.block_size, args.kv_heads, args.head_dim, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, args.heads, args.head_dim, device="cuda", dtype=dtype)
    scale = args.head_dim**-0.5
    read_bytes = kv_bytes + q.numel() * elem
    ms = time_ms(torch, lambda: paged_attention_decode(q, cache, tables, seq_lens, scale, max_seq_len=context),
                 args.iters)
    row = {"batch": batch, "context": context, "kv_mb": kv_bytes / 1e6, "triton_us": ms * 1e3,
           "triton_gbps": read_bytes / ms / 1e6}
    ref_bytes = 4 * kv_bytes * (4 // elem)  # float32 gathered copies of K and V (and their inputs)
    if ref_bytes <= args.max_ref_gb * 1e9:
        ref_ms = time_ms(torch, lambda: paged_attention_decode_ref(q, cache, tables, seq_lens, scale), args.iters)
        row.update(torch_us=ref_ms * 1e3, torch_gbps=read_bytes / ref_ms / 1e6, speedup=ref_ms / ms)
    return row


def bench_decode(torch, args, peak: float | None) -> dict[str, Any]:
    rows = []
    for batch in args.batch_sizes:
        for context in args.context_lens:
            row = _decode_case(torch, args, batch, context)
            torch.cuda.empty_cache()  # the case's cache is garbage now
            if row is not None:
                if peak:
                    row["triton_pct_peak"] = 100 * row["triton_gbps"] / peak
                rows.append(row)
    header = f"{'batch':>6} {'context':>8} {'KV MB':>9} {'triton us':>10} {'GB/s':>8} {'% peak':>7} " \
             f"{'torch us':>10} {'GB/s':>8} {'speedup':>8}"
    print(header)
    for r in rows:
        pct = f"{r['triton_pct_peak']:7.1f}" if "triton_pct_peak" in r else f"{'-':>7}"
        ref = (f"{r['torch_us']:10.1f} {r['torch_gbps']:8.0f} {r['speedup']:7.2f}x" if "torch_us" in r
               else f"{'-':>10} {'-':>8} {'-':>8}")
        print(f"{r['batch']:6d} {r['context']:8d} {r['kv_mb']:9.1f} {r['triton_us']:10.1f} "
              f"{r['triton_gbps']:8.0f} {pct} {ref}")
    shape = {k: getattr(args, k) for k in ("dtype", "heads", "kv_heads", "head_dim", "block_size")}
    return {"benchmark": "decode_attention", "shape": shape, "rows": rows}


def weight_bytes(model_dir: Path, dtype_bytes: int = 2) -> int:
    """Bytes of the checkpoint's floating-point tensors once cast to the serving dtype (bf16),
    read from the safetensors headers without loading any tensor. An untied input embedding is
    counted too although a step reads one row of it, so the roofline is slightly conservative."""
    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        sys.exit(f"{model_dir} has no *.safetensors files")
    for path in files:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
            total += count * (dtype_bytes if is_float else SAFETENSORS_ELEM_BYTES.get(info["dtype"], 1))
    return total


def bench_e2e(torch, args, peak: float | None) -> dict[str, Any]:
    try:
        from pagedserve import LLM, SamplingParams
    except ImportError as exc:
        sys.exit(f"--e2e needs the offline API (from pagedserve import LLM, SamplingParams): {exc}")
    model_dir = Path(args.e2e)
    llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=args.enforce_eager)
    graphs = llm.runner.decode_graphs
    prompt = ["The quick brown fox jumps over the lazy dog. " * 4]

    def run(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        generated = len(outputs[0].outputs[0].token_ids)
        if generated != max_tokens:
            sys.exit(f"asked for {max_tokens} tokens with ignore_eos=True, got {generated}")
        return elapsed

    run(8)  # warmup: compilation, autotuning, allocator
    first = statistics.median(run(1) for _ in range(3))  # prefill + one token
    total = statistics.median(run(args.max_tokens) for _ in range(3))
    tok_s = (args.max_tokens - 1) / max(total - first, 1e-9)
    wbytes = weight_bytes(model_dir)
    roofline = peak * 1e9 / wbytes if peak else None
    mode = "eager" if graphs is None else "cuda_graphs"
    if graphs is not None and graphs.replays == 0:
        sys.exit("CUDA graphs were captured but no decode step replayed one")
    result = {"benchmark": "e2e_decode_batch1", "model": str(model_dir), "max_tokens": args.max_tokens,
              "mode": mode, "weight_gb": wbytes / 1e9, "decode_tok_s": tok_s, "roofline_tok_s": roofline,
              "pct_roofline": 100 * tok_s / roofline if roofline else None, "prefill_plus_1_s": first}
    print(f"{'model':>30} {'mode':>11} {'weights GB':>10} {'tok/s':>8} {'roofline':>9} {'% roof':>7}")
    roof = f"{roofline:9.0f} {result['pct_roofline']:7.1f}" if roofline else f"{'-':>9} {'-':>7}"
    print(f"{model_dir.name[-30:]:>30} {mode:>11} {wbytes / 1e9:10.2f} {tok_s:8.1f} {roof}")
    return result


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--e2e", metavar="MODEL_DIR", help="batch-1 decode tokens/s through pagedserve.LLM")
    p.add_argument("--max-tokens", type=int, default=256, help="--e2e: tokens generated per timed request")
    p.add_argument("--enforce-eager", action="store_true", help="--e2e: run decode eagerly (no CUDA graphs)")
    p.add_argument("--peak-gbps", type=float, help="peak HBM bandwidth (default by device: H100 3350, H200 4800)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--context-lens", type=_ints, default=[512, 2048, 8192, 32768])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-kv-gb", type=float, default=16.0, help="skip cases whose K/V exceed this")
    p.add_argument("--max-ref-gb", type=float, default=24.0, help="skip the torch reference above this")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch = _require_cuda()
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or default_peak_gbps(name)
    print(f"device: {name}, peak {peak or 'unknown (pass --peak-gbps)'} GB/s")
    result = bench_e2e(torch, args, peak) if args.e2e else bench_decode(torch, args, peak)
    result.update(device=name, peak_gbps=peak)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
    main()
