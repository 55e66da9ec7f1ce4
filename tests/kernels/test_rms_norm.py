"""Fused residual-add RMSNorm against its reference and against Hugging Face's LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETED, TOLERANCES

pytest.importorskip("triton")

from kernels.rms_norm import rms_norm, rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _residual_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """x + residual is rounded once, like torch, so it is bit-exact; except that the interpreter
    truncates float32 -> bfloat16 instead of rounding to nearest (one ulp)."""
    return TOLERANCES[dtype] if INTERPRETED and dtype == torch.bfloat16 else {"atol": 0, "rtol": 0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 64])
def test_matches_reference(dtype, hidden):
    x = torch.randn(5, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(5, hidden, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), **TOLERANCES[dtype])
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    expected_out, expected_residual = rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(new_residual, expected_residual, **_residual_tolerance(dtype))
    torch.testing.assert_close(out, expected_out, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_huggingface(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hidden = 32
    norm = llama.LlamaRMSNorm(hidden, eps=1e-5).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    x = torch.randn(4, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(4, hidden, device=DEVICE).to(dtype)
    with torch.no_grad():
        expected = norm(x + residual)
    out, new_residual = rms_norm(x, norm.weight.detach(), 1e-5, residual)
    torch.testing.assert_close(new_residual, x + residual, **_residual_tolerance(dtype))
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_strided_rows_and_bad_arguments():
    x = torch.randn(3, 64, device=DEVICE)[:, :32]  # rows with stride 64
    weight = torch.ones(32, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(31, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x, weight, 1e-6, x.half())
