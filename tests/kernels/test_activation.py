"""silu_and_mul against its reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES

pytest.importorskip("triton")

from kernels.activation import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inter", [24, 1500])  # one partial block; several blocks per row
def test_matches_reference(dtype, inter):
    x = (3 * torch.randn(4, 2 * inter, device=DEVICE)).to(dtype)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOLERANCES[dtype])


def test_writes_into_out_and_checks_shapes():
    x = torch.randn(3, 32, device=DEVICE)
    out = torch.empty(3, 16, device=DEVICE)
    assert silu_and_mul(x, out) is out
    torch.testing.assert_close(out, silu_and_mul_ref(x), **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 31, device=DEVICE))
    with pytest.raises(ValueError, match="out must have shape"):
        silu_and_mul(x, torch.empty(3, 15, device=DEVICE))
