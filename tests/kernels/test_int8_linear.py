"""The W8A16 Triton GEMM against its torch reference (dequantize, then F.linear)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, skip_unsupported

pytest.importorskip("triton")

from kernels.int8_linear import int8_linear_ref, int8_linear_triton
from services.worker.quant.int8 import quantize_per_channel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 96, 64), (37, 130, 200)], ids=["decode", "ragged"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(dtype, rows, n, k, bias):
    skip_unsupported(dtype, uses_dot=True)
    weight, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k).to(device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    weight, scale = weight.to(DEVICE), scale.to(DEVICE)
    out = int8_linear_triton(x, weight, scale, b)
    expected = int8_linear_ref(x.float(), weight, scale, None if b is None else b.float())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


def test_rejects_bad_arguments():
    weight, scale = quantize_per_channel(torch.randn(8, 16))
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight dtype"):
        int8_linear_triton(x, weight.float().to(DEVICE), scale.to(DEVICE))
    with pytest.raises(ValueError, match="scale must have shape"):
        int8_linear_triton(x, weight.to(DEVICE), scale[:4].to(DEVICE))
