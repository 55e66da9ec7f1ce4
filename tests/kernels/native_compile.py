"""Compile every Triton kernel natively for NVIDIA GPUs, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it accepts programs the
real compiler rejects (shapes, dtypes, layouts) and says nothing about registers or shared memory.
This script runs each kernel wrapper on CPU tensors with the launches intercepted: every launch is
compiled ahead of time by Triton's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for
real targets (sm_80, sm_90), with the same argument specialization the JIT would use, and the
cubin's resource usage (registers, spilled bytes, shared memory) is read back with cuobjdump.

Run it in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions):

    python tests/kernels/native_compile.py          # a table of every compiled variant
    python tests/kernels/native_compile.py --json   # the same as JSON (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import (
    _checks,
    activation,
    fused_moe,
    kv_cache_write,
    lora,
    packed_int_linear,
    paged_attention_decode,
    paged_attention_prefill,
    rms_norm,
    rotary,
)

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# Hopper and Ampere (A100) give a block up to 227 / 163 KiB of shared memory.
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclasses.dataclass
class Compiled:
    kernel: str
    case: str
    target: str
    num_warps: int
    shared: int
    registers: int
    spilled: int  # bytes of stack and local memory per thread: register spills, arrays off registers


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` compiles instead of launching."""

    def __init__(self, jit_fn: triton.JITFunction, sink: list[tuple]):
        self.jit_fn = jit_fn
        self.sink = sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.jit_fn, args, kwargs))


def specialize(jit_fn, args, kwargs, target: GPUTarget) -> tuple[ASTSource, dict]:
    """The JIT's own path from a launch to the source and options it compiles, for an explicit target."""
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(
        backend, kwargs, bound_args, specialization, None
    )
    return ASTSource(jit_fn, signature, constexprs, attrs), options.__dict__


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes) per thread from cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    if len(usage) != 3:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return usage["REG"], usage["STACK"] + usage["LOCAL"]


# Attention shapes of the supported model families: (heads, kv heads, head_dim).
ATTENTION_SHAPES = {
    "llama-8b": (32, 8, 128),
    "qwen2.5-1.5b": (12, 2, 128),
    "smol-135m": (9, 3, 64),
    "opt": (12, 12, 64),
    "head256": (8, 1, 256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _paged(seq_lens, block_size, num_kv_heads, head_dim, dtype):
    blocks = [-(-n // block_size) for n in seq_lens]
    cache = torch.zeros(2, sum(blocks) + 1, block_size, num_kv_heads, head_dim, dtype=dtype)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    return cache, table, torch.tensor(seq_lens, dtype=torch.int32)


def _decode(shape, dtype, block_size, splits, balance):
    heads, kv_heads, head_dim = shape
    cache, table, lens = _paged([300, 40], block_size, kv_heads, head_dim, dtype)
    q = torch.zeros(2, heads, head_dim, dtype=dtype)
    paged_attention_decode.paged_attention_decode(
        q, cache, table, lens, 0.1, max_seq_len=300, num_splits=splits, balance_splits=balance
    )


def _prefill(shape, dtype, block_size):
    heads, kv_heads, head_dim = shape
    cache, table, lens = _paged([100, 37], block_size, kv_heads, head_dim, dtype)
    qsl = torch.tensor([0, 23, 60], dtype=torch.int32)
    q = torch.zeros(60, heads, head_dim, dtype=dtype)
    paged_attention_prefill.paged_attention_prefill(q, cache, table, lens, qsl, 0.1, max_query_len=37)


def _fused_qkv(shape, dtype):
    """q, k, v as the strided column slices of one fused qkv projection output, as the models pass them."""
    heads, kv_heads, head_dim = shape
    qkv = torch.zeros(5, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    return q, k, v


def _kv_write(shape, dtype):
    _, kv_heads, head_dim = shape
    _, k, v = _fused_qkv(shape, dtype)
    cache = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=dtype)
    kv_cache_write.kv_cache_write(
        k.view(5, kv_heads, head_dim), v.view(5, kv_heads, head_dim), cache, torch.tensor([0, 1, 17, -1, 40])
    )


def _rotary(shape, dtype):
    q, k, _ = _fused_qkv(shape, dtype)
    rotary.rotary_embedding(torch.arange(5), q, k, rotary.rope_cos_sin_cache(shape[2], 64))


def _rms_norm(hidden, dtype, residual):
    x = torch.zeros(3, hidden, dtype=dtype)
    rms_norm.rms_norm(x, torch.ones(hidden, dtype=dtype), 1e-6, torch.zeros_like(x) if residual else None)


# MoE layer shapes: (hidden, expert intermediate, experts, top_k).
MOE_SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}


def _moe(shape, dtype, num_tokens):
    hidden, inter, experts, top_k = shape
    x = torch.zeros(num_tokens, hidden, dtype=dtype)
    w13, w2 = torch.zeros(experts, 2 * inter, hidden, dtype=dtype), torch.zeros(experts, hidden, inter, dtype=dtype)
    ids = torch.arange(num_tokens * top_k).view(num_tokens, top_k) % experts
    fused_moe.fused_moe(x, w13, w2, torch.full(ids.shape, 1.0 / top_k), ids)


# LoRA layer shapes: (in, out, slots x fused rank) of qwen2.5-1.5b's qkv (3 x rank 16) and down
# projections (rank 64, the widest tile).
LORA_SHAPES = {"qkv r16": (1536, 2048, 48), "down r64": (8960, 1536, 64), "gate_up r64": (1536, 17920, 128)}


def _lora(shape, dtype):
    k, n, rank = shape
    x, y = torch.zeros(5, k, dtype=dtype), torch.zeros(5, n, dtype=dtype)
    a, b = torch.zeros(4, rank, k, dtype=dtype), torch.zeros(4, n, rank, dtype=dtype)
    lora.lora_delta(x, y, a, b, torch.tensor([0, -1, 3, 3, 1], dtype=torch.int32))


# Grouped-int (GPTQ / AWQ) GEMM shape: (in, out) of llama-8b's qkv projection (other shapes whose
# sizes are multiples of 16 specialize to the same binaries).
PACKED_INT_SHAPES = {"llama-8b qkv": (4096, 6144)}


def _packed_int(shape, dtype, bits, num_tokens):
    k, n = shape
    words = torch.zeros(k // (32 // bits), n, dtype=torch.int32)
    zeros, scales = torch.zeros(k // 128, n, dtype=torch.int32), torch.ones(k // 128, n)
    g_idx = torch.arange(k, dtype=torch.int32) // 128
    packed_int_linear.packed_int_linear_triton(torch.zeros(num_tokens, k, dtype=dtype), words, zeros, scales, g_idx,
                                               bits)


def cases():
    """(kernel family, case name, thunk running the wrapper once) over the variants we ship.

    Every attention shape in bfloat16 and float32 at block size 16; float16 (the same code as
    bfloat16) and block size 32 (another constant in the position split) on one shape each.
    """
    attention = [(name, dname, 16) for name in ATTENTION_SHAPES for dname in ("bf16", "fp32")]
    attention += [("qwen2.5-1.5b", "fp16", 16), ("qwen2.5-1.5b", "bf16", 32), ("qwen2.5-1.5b", "fp32", 32)]
    for name, dname, block_size in attention:
        shape, dtype, tag = ATTENTION_SHAPES[name], DTYPES[dname], f"{name} {dname} bs{block_size}"
        yield "decode", f"{tag} split1", partial(_decode, shape, dtype, block_size, 1, False)
        yield "decode", f"{tag} split4", partial(_decode, shape, dtype, block_size, 4, False)
        yield "decode", f"{tag} split4 balanced", partial(_decode, shape, dtype, block_size, 4, True)
        yield "prefill", tag, partial(_prefill, shape, dtype, block_size)
    for dname, dtype in DTYPES.items():
        for name, shape in ATTENTION_SHAPES.items():
            yield "kv_cache_write", f"{name} {dname}", partial(_kv_write, shape, dtype)
            yield "rotary", f"{name} {dname}", partial(_rotary, shape, dtype)
        for hidden in (576, 1536, 4096, 8192):
            yield "rms_norm", f"hidden{hidden} {dname}", partial(_rms_norm, hidden, dtype, False)
            yield "rms_norm", f"hidden{hidden} {dname} residual", partial(_rms_norm, hidden, dtype, True)
        for name, shape in MOE_SHAPES.items():
            for num_tokens in (4, 512):  # decode-sized and prefill-sized: BLOCK_M 16 and 64
                yield "fused_moe", f"{name} {dname} T{num_tokens}", partial(_moe, shape, dtype, num_tokens)
        for name, shape in LORA_SHAPES.items():
            yield "lora", f"{name} {dname}", partial(_lora, shape, dtype)
        for (name, shape), bits, num_tokens in itertools.product(PACKED_INT_SHAPES.items(), (4, 8), (4, 512)):
            yield "packed_int_linear", f"{name} {dname} w{bits} T{num_tokens}", partial(
                _packed_int, shape, dtype, bits, num_tokens)
        for inter in (1536, 8960, 14336):
            x = torch.zeros(3, 2 * inter, dtype=dtype)
            yield "silu_and_mul", f"inter{inter} {dname}", partial(activation.silu_and_mul, x)


# every kernel module imported above (their wrappers call one another, e.g. fused_moe -> activation)
KERNEL_MODULES = tuple(m for name, m in sys.modules.items() if name.startswith("kernels."))


def compile_all(targets: list[str], only: str | None = None) -> list[Compiled]:
    launches: list[tuple] = []
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, triton.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(value, launches))
    _checks.interpreting = lambda: True  # the wrappers run on CPU tensors; nothing is launched
    results, seen = [], set()
    for family, case, run in cases():
        if only and only not in family:
            continue
        launches.clear()
        run()
        for jit_fn, args, kwargs in launches:
            for target_name in targets:
                src, options = specialize(jit_fn, args, kwargs, TARGETS[target_name])
                key = (target_name, src.hash(), repr(sorted(options.items())))
                if key in seen:  # several cases specialize to the same binary
                    continue
                seen.add(key)
                compiled = triton.compile(src, target=TARGETS[target_name], options=options)
                regs, local = resource_usage(compiled.asm["cubin"])
                results.append(
                    Compiled(
                        jit_fn.__name__,
                        case,
                        target_name,
                        compiled.metadata.num_warps,
                        compiled.metadata.shared,
                        regs,
                        local,
                    )
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="sm_80,sm_90")
    parser.add_argument("--only", help="kernel family substring, e.g. decode")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = compile_all(args.targets.split(","), args.only)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
        return
    print(f"{'kernel':<24} {'case':<36} {'target':<6} {'warps':>5} {'regs':>5} {'spill B':>7} {'smem B':>7}")
    for r in results:
        print(
            f"{r.kernel:<24} {r.case:<36} {r.target:<6} {r.num_warps:>5} {r.registers:>5} {r.spilled:>7} {r.shared:>7}"
        )


if __name__ == "__main__":
    main()
