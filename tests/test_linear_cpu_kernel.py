"""The CPU float32 linear kernel (kernels/f32_linear_cpu.c) against F.linear, where the layers use
it, and the fallback when no C compiler is there; both linear kernels (float32, int8) on many
threads and in a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_build, f32_linear_cpu, int8_linear_cpu
from services.worker import step_threads
from services.worker.layers.linear import ReplicatedLinear
from services.worker.quant.int8 import quantize_per_channel

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not f32_linear_cpu.available(), reason="no C compiler")


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 15, 16, 17, 23, 24, 35, 36, 40, 47, 64])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (7, 64), (13, 576), (1030, 96), (37, 520)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_f_linear(rows, n, k, bias, dtype):
    """Every tile shape of both paths: dot products (4 to 1 rows by 3 or 1 weight rows) and packed
    panels (8 with AVX512, 6 to 1 rows by 16 weight rows, K in panels of 256 and a shorter last one), split over
    the threads. bfloat16 weights are widened exactly, so the float32 sums match F.linear over the
    widened weights; the result comes back in x's dtype."""
    torch.manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k).to(dtype)
    b = torch.randn(n) if bias else None
    out = f32_linear_cpu.f32_linear(x, w, b)
    assert out.shape == (rows, n) and out.dtype == dtype
    want = F.linear(x.float(), w.float(), b).to(dtype)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5 if dtype == torch.float32 else 8e-3)


def _float32_call(w: torch.Tensor):
    return (lambda x: f32_linear_cpu.f32_linear(x, w)), (lambda x: F.linear(x, w))


def _int8_call(w: torch.Tensor):
    q, scale = quantize_per_channel(w)
    return (lambda x: int8_linear_cpu.int8_linear(x, q, scale, None)), (lambda x: int8_linear_cpu.int8_linear_ref(x, q, scale, None))


@pytest.mark.parametrize("calls", [_float32_call, _int8_call], ids=["float32", "int8"])
def test_kernel_threads_in_threads_and_in_a_forked_child(calls):
    """Many threads' shares of one call (kernels/cpu_pool.h), and a child forked after the pool
    started, which has no pool threads (as the offline ranks' fork server does): right answers,
    and no hang on the parent's lock."""
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    kernel, reference = calls(torch.randn(4099, 64))
    want = reference(x)
    cpu_build.set_threads(8)
    try:
        torch.testing.assert_close(kernel(x), want, atol=1e-4, rtol=1e-5)
        pid = os.fork()
        if pid == 0:  # the child reports through its exit status
            ok = torch.allclose(kernel(x), want, atol=1e-4, rtol=1e-5)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        torch.testing.assert_close(kernel(x), want, atol=1e-4, rtol=1e-5)
    finally:
        cpu_build.set_threads(None)


def test_layers_take_the_kernel_for_few_rows_only():
    layer = ReplicatedLinear(64, 24, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    with torch.inference_mode():
        for rows in (1, f32_linear_cpu.MAX_ROWS, f32_linear_cpu.MAX_ROWS + 1):
            x = torch.randn(2, rows, 64)  # leading dims flatten into rows
            assert f32_linear_cpu.usable(x[0], layer.weight) == (rows <= f32_linear_cpu.MAX_ROWS)
            torch.testing.assert_close(layer(x[0]), F.linear(x[0], layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
        x = torch.randn(3, 60)
        assert not f32_linear_cpu.usable(x, torch.randn(5, 60))  # K not a multiple of 8
        x, w = torch.randn(3, 64), torch.randn(5, 64)
        assert f32_linear_cpu.usable(x.bfloat16(), w.bfloat16())
        assert not f32_linear_cpu.usable(x.bfloat16(), w)  # dtypes differ
        assert not f32_linear_cpu.usable(x.half(), w.half())


def test_without_a_compiler_f_linear_runs(tmp_path):
    code = ("import torch; from kernels import f32_linear_cpu as k; assert not k.available();"
            "x, w = torch.randn(2, 8), torch.randn(3, 8);"
            "assert torch.equal(k.linear(x, w), torch.nn.functional.linear(x, w))")
    env = {**os.environ, "CC": "false", "PAGEDSERVE_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CPU float32 linear kernel unavailable" in proc.stderr


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread only")
def test_decode_sized_steps_run_torch_on_one_thread_but_sample_on_all_and_restore_it():
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        with step_threads.for_step(cpu, dtype, f32_linear_cpu.MAX_ROWS):
            assert torch.get_num_threads() == 1
            assert cpu_build.threads() == before  # the kernels keep every thread
            with step_threads.for_sampling(1):
                assert torch.get_num_threads() == 1
            with step_threads.for_sampling(2):  # rows of the whole vocabulary: every thread
                assert torch.get_num_threads() == before
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before and cpu_build.threads() == before
    for tokens, dtype in ((f32_linear_cpu.MAX_ROWS + 1, torch.float32), (1, torch.float16)):
        with step_threads.for_step(cpu, dtype, tokens), step_threads.for_sampling(8):
            assert torch.get_num_threads() == before
