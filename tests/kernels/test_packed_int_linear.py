"""The grouped 4/8-bit (GPTQ / AWQ) Triton GEMM against its torch reference (unpack, dequantize,
then F.linear), on act-order and consecutive groups."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, skip_unsupported

pytest.importorskip("triton")

from kernels.packed_int import pack_int32
from kernels.packed_int_linear import packed_int_linear_ref, packed_int_linear_triton
from pagedserve.test_quant_packed import quantize_grouped


def _packed(n: int, k: int, bits: int, group_size: int, act_order: bool):
    codes, zeros, scales, g_idx = quantize_grouped(torch.randn(n, k) * 0.05, bits, group_size, sym=not act_order,
                                                   act_order=act_order)
    return [t.to(DEVICE) for t in (pack_int32(codes.t(), bits, dim=0), zeros.t().contiguous(),
                                   scales.t().float().contiguous(), g_idx)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n", "k", "group_size"), [(1, 96, 64, 32), (37, 130, 192, 64), (5, 64, 128, -1)],
                         ids=["decode", "ragged", "one-group"])
@pytest.mark.parametrize(("bits", "act_order"), [(4, False), (4, True), (8, False)])
def test_matches_reference(dtype, rows, n, k, group_size, bits, act_order):
    skip_unsupported(dtype, uses_dot=True)
    qweight, zeros, scales, g_idx = _packed(n, k, bits, group_size, act_order)
    x = torch.randn(rows, k).to(device=DEVICE, dtype=dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if rows == 37 else None
    out = packed_int_linear_triton(x, qweight, zeros, scales, g_idx, bits, bias)
    expected = packed_int_linear_ref(x.float(), qweight, zeros, scales, g_idx, bits, None if bias is None else bias.float())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


def test_rejects_bad_arguments():
    qweight, zeros, scales, g_idx = _packed(16, 64, 4, 32, False)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="qweight dtype"):
        packed_int_linear_triton(x, qweight.float(), zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        packed_int_linear_triton(x[:, :32].contiguous(), qweight, zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="not supported"):
        packed_int_linear_triton(x, qweight, zeros, scales, g_idx, 3)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        packed_int_linear_triton(x, qweight, zeros, scales, g_idx[:8], 4)
