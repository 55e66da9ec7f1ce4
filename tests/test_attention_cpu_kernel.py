"""The CPU paged decode kernel (kernels/paged_decode_cpu.c) against the torch backend's gather +
SDPA path, and the fallback when no C compiler is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import paged_decode_cpu
from services.worker.layers.attention_backend import CommonAttentionMetadata
from services.worker.layers.attention_torch import TorchAttentionBackend

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not paged_decode_cpu.available(), reason="no C compiler")


def reference(q, kv_cache, table, seq_lens, scale):
    """Per request and query head: softmax(q k^T) v over its first seq_len cached tokens."""
    block, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        slots = torch.tensor([int(table[b, p // block]) * block + p % block for p in range(n)])
        k = kv_cache[0].flatten(0, 1)[slots]  # [n, Hkv, D]
        v = kv_cache[1].flatten(0, 1)[slots]
        for h in range(q.shape[1]):
            p = torch.softmax(k[:, h // group] @ q[b, h] * scale, dim=0)
            out[b, h] = p @ v[:, h // group]
    return out


# 5 requests split over their KV heads; 40 taken whole, a block's rows for all heads at once
BATCHES = pytest.mark.parametrize("copies", [1, 8])


@BATCHES
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_kernel_matches_the_reference(heads, kv_heads, dim, copies):
    gen = torch.Generator().manual_seed(heads * dim)
    block = 16
    seq_lens = torch.tensor([1, 17, 33, 100, 5] * copies)  # one token, block edges, several blocks
    width = -(-int(seq_lens.max()) // block)
    blocks = len(seq_lens) * width
    table = torch.randperm(blocks, generator=gen).view(len(seq_lens), width)
    kv_cache = torch.randn(2, blocks, block, kv_heads, dim, generator=gen)
    q = torch.randn(len(seq_lens), heads, dim, generator=gen)
    got = paged_decode_cpu.paged_decode(q, kv_cache, table, seq_lens, dim**-0.5)
    torch.testing.assert_close(got, reference(q, kv_cache, table, seq_lens, dim**-0.5), atol=1e-5, rtol=1e-5)


def test_the_backend_decodes_through_the_kernel_as_the_gather_path_did():
    gen = torch.Generator().manual_seed(1)
    seq_lens, block = [70, 40, 9], 8
    tables = [list(range(1, 10)), list(range(10, 15)), [15, 16]]
    slots = [tables[i][(n - 1) // block] * block + (n - 1) % block for i, n in enumerate(seq_lens)]
    common = CommonAttentionMetadata([0, 1, 2, 3], seq_lens, tables, torch.tensor(slots), 3, block, torch.device("cpu"))
    q, k, v = torch.randn(3, 6, 16, generator=gen), torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    kv_cache = torch.randn(2, 17, block, 2, 16, generator=gen)
    backend = TorchAttentionBackend()
    meta = backend.build(common)
    assert all(g.seq_lens is not None for g in meta.groups)  # the kernel runs these decodes
    out = backend.forward(q, k, v, kv_cache, meta, 0.25)
    assert torch.equal(kv_cache[0].flatten(0, 1)[slots], k)  # this step's k/v written first
    table = torch.tensor([t + [0] * (9 - len(t)) for t in tables])
    torch.testing.assert_close(out, reference(q, kv_cache, table, torch.tensor(seq_lens), 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "dim"),
    [([1, 4, 3], [30, 21, 3], 16), ([1, 40, 70], [30, 65, 70], 64), ([1, 20], [30, 2100], 64)],
)
def test_several_query_tokens_per_request_match_the_masked_sdpa_path(q_lens, seq_lens, dim):
    """Speculative verification and prompt chunks: a decode, a request verifying tokens or
    prefilling a chunk after its context, and a fresh prompt in one step take the kernel (one row
    per query token, each seeing the context up to itself; a chunk after a long context, SDPA),
    and each token's output is attention over its keys so far."""
    gen = torch.Generator().manual_seed(2)
    block = 8
    sizes = [-(-n // block) for n in seq_lens]
    tables = [list(range(1 + sum(sizes[:r]), 1 + sum(sizes[: r + 1]))) for r in range(len(sizes))]
    starts = [sum(q_lens[:r]) for r in range(len(q_lens) + 1)]
    slots = torch.tensor([tables[r][p // block] * block + p % block for r, (n, q) in enumerate(zip(seq_lens, q_lens))
                          for p in range(n - q, n)])
    common = CommonAttentionMetadata(starts, seq_lens, tables, slots, 1, block, torch.device("cpu"))
    t, blocks = starts[-1], 1 + sum(sizes)
    q, k, v = (torch.randn(t, heads, dim, generator=gen) for heads in (6, 2, 2))
    kv_cache = torch.randn(2, blocks, block, 2, dim, generator=gen)
    kernel = TorchAttentionBackend()
    meta = kernel.build(common)
    rows = [n - ql + i + 1 for n, ql in zip(seq_lens, q_lens) for i in range(ql)]
    if max(seq_lens) <= 2048:  # one kernel call; past that a chunk's context goes to SDPA
        assert len(meta.groups) == 1 and meta.groups[0].seq_lens.tolist() == rows
    else:
        assert [g.seq_lens is not None for g in meta.groups] == [True, False]
    got = kernel.forward(q, k, v, kv_cache.clone(), meta, 0.25)
    want = []
    for r, (n, ql) in enumerate(zip(seq_lens, q_lens)):  # each token against keys up to its own position
        cache = kv_cache.clone()
        cache[0].flatten(0, 1)[slots] = k
        cache[1].flatten(0, 1)[slots] = v
        table = torch.tensor([tables[r]])
        for i in range(ql):
            token = starts[r] + i
            want.append(reference(q[token : token + 1], cache, table, torch.tensor([n - ql + i + 1]), 0.25))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_without_a_compiler_the_backend_keeps_its_torch_path(tmp_path):
    code = (
        "import torch; from kernels import paged_decode_cpu as k;"
        "assert not k.available();"
        "from services.worker.layers.attention_torch import _decode_kernel;"
        "assert not _decode_kernel(torch.device('cpu'), torch.float32, torch.float32)"
    )
    env = {**os.environ, "CC": "false", "PAGEDSERVE_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CPU paged decode kernel unavailable" in proc.stderr


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """A library built with -ffast-math turns on flush-to-zero for its whole process (every other
    computation, and hypothesis, then see subnormals vanish); this one is not."""
    code = ("import sys; from kernels import paged_decode_cpu; assert paged_decode_cpu.available(); "
            "tiny = sys.float_info.min; assert tiny / 2 > 0 and tiny * 0.5 != 0, 'flush-to-zero is on'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


FP8 = pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
NARROW = pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16],
                                 ids=["e4m3", "e5m2", "bf16"])
DIMS = pytest.mark.parametrize("dim", [64, 128, 40])  # the fixed-size loops and the any-dim loop


@NARROW
@DIMS
@BATCHES
def test_kernel_reads_a_narrow_cache_widened_and_fp8_times_its_scales(dtype, dim, copies):
    gen = torch.Generator().manual_seed(7 + dim)
    block, heads, kv_heads = 16, 9, 3
    seq_lens = torch.tensor([1, 40, 100] * copies)
    blocks = 7 * len(seq_lens)
    table = torch.randperm(blocks, generator=gen).view(len(seq_lens), 7)
    kv_cache = torch.randn(2, blocks, block, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(seq_lens), heads, dim, generator=gen)
    got = paged_decode_cpu.paged_decode(q, kv_cache, table, seq_lens, dim**-0.5, 0.5, 2.0)
    k_scale, v_scale = (0.5, 2.0) if dtype in paged_decode_cpu.FP8_DTYPES else (1.0, 1.0)
    widened = torch.stack([kv_cache[0].float() * k_scale, kv_cache[1].float() * v_scale])
    torch.testing.assert_close(got, reference(q, widened, table, seq_lens, dim**-0.5), atol=1e-5, rtol=1e-5)


@FP8
@DIMS
def test_every_fp8_byte_widens_exactly_as_torch_does(dtype, dim):
    """One cached token gets all the attention, so each output head is its value row exactly as the
    kernel widened it: all 256 bytes against torch's .float(), except NaN and infinity, which a
    saturating cache write never stores."""
    kv_heads = -(-256 // dim)
    values = (torch.arange(kv_heads * dim) % 256).to(torch.uint8).view(dtype).view(kv_heads, dim)
    kv_cache = torch.zeros(2, 1, 16, kv_heads, dim, dtype=dtype)
    kv_cache[1, 0, 0] = values
    q = torch.randn(1, kv_heads, dim)
    got = paged_decode_cpu.paged_decode(q, kv_cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 0.1)
    want = values.float()
    finite = want.isfinite()
    assert finite.sum() >= 248  # e5m2: 2 infinities and 6 NaNs of 256 bytes
    assert torch.equal(got[0][finite], want[finite])


@DIMS
def test_bfloat16_values_widen_exactly(dim):
    """One cached token gets all the attention: each output head is its bfloat16 value row as
    float32 exactly (random values, zeros and subnormals among them)."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 1 << 16, (4, dim), generator=gen, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values[values.float().isnan() | values.float().isinf()] = 1.5
    values[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -1e-39]).to(torch.bfloat16)
    kv_cache = torch.zeros(2, 1, 16, 4, dim, dtype=torch.bfloat16)
    kv_cache[1, 0, 0] = values
    q = torch.randn(1, 4, dim)
    got = paged_decode_cpu.paged_decode(q, kv_cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 0.1)
    assert torch.equal(got[0], values.float())


def test_a_bfloat16_model_attends_through_the_kernel():
    """bfloat16 queries, keys and values: the backend writes the bfloat16 cache and the kernel reads
    it, within bfloat16's rounding of the float32 reference."""
    gen = torch.Generator().manual_seed(5)
    seq_lens, block = [40, 9], 8  # one decode, one 9-token prompt
    tables = [list(range(1, 6)), [6, 7]]
    pos = [[39], list(range(9))]
    slots = [tables[i][p // block] * block + p % block for i in range(2) for p in pos[i]]
    common = CommonAttentionMetadata([0, 1, 10], seq_lens, tables, torch.tensor(slots), 1, block, torch.device("cpu"))
    q, k, v = (torch.randn(10, h, 64, generator=gen).bfloat16() for h in (6, 2, 2))
    kv_cache = torch.randn(2, 8, block, 2, 64, generator=gen).bfloat16()
    backend = TorchAttentionBackend(torch.bfloat16)
    meta = backend.build(common)
    assert [g.seq_lens is not None for g in meta.groups] == [True]
    out = backend.forward(q, k, v, kv_cache, meta, 0.125)
    assert out.dtype == torch.bfloat16
    assert torch.equal(kv_cache[1].flatten(0, 1)[slots], v)
    table = torch.tensor([t + [0] * (5 - len(t)) for t in tables])
    rows = [(0, 40)] + [(1, n) for n in range(1, 10)]  # each prompt token sees the context up to itself
    want = torch.cat([reference(q[i:i + 1].float(), kv_cache.float(), table[[b]], torch.tensor([n]), 0.125)
                      for i, (b, n) in enumerate(rows)])
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
