"""Every Triton kernel variant the wrappers launch compiles natively for sm_80 and sm_90 and fits.

Runs without a GPU: tests/kernels/native_compile.py compiles each launch ahead of time with
Triton's own pipeline and ptxas, then reads the cubin's resource usage. The interpreter tests
check the arithmetic; this checks that the same programs build for real GPUs, within the
registers and shared memory of a block and without spilling to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("native_compile.py")
KERNELS = {
    "_decode_kernel",
    "_grouped_gemm_kernel",
    "_reduce_kernel",
    "_prefill_kernel",
    "_kv_cache_write_kernel",
    "_rotary_kernel",
    "_rms_norm_kernel",
    "_silu_and_mul_kernel",
    "_lora_shrink_kernel",
    "_lora_expand_kernel",
    "_packed_int_linear_kernel",
}
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# ptxas may keep a word or two on the stack at 8 warps; real spills are hundreds of bytes.
MAX_STACK_BYTES = 16


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_kernel_compiles_for_ampere_and_hopper(compiled):
    built = {(r["kernel"], r["target"]) for r in compiled}
    assert built == {(k, t) for k in KERNELS for t in MAX_SHARED}


def test_no_variant_spills_or_overflows_a_block(compiled):
    too_big = [r for r in compiled if r["shared"] > MAX_SHARED[r["target"]] or r["registers"] > 255]
    spilling = [r for r in compiled if r["spilled"] > MAX_STACK_BYTES]
    assert not too_big, too_big
    assert not spilling, spilling
