"""RMSNorm with the residual add fused in: one read of x and residual, one write of each output.

Semantics follow Hugging Face's RMSNorm: the residual sum is rounded to the input dtype, the
variance and normalization run in float32, the normalized value is rounded to the input dtype
and then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, eps, n_cols,
    stride_x, stride_r, stride_o, stride_nr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference with the same rounding points as the Hugging Face implementation."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight * normed).to(x.dtype)
    return out if residual is None else (out, x)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, N] with weight [N]. With residual [T, N]: returns (out, x + residual),
    the sum being the next layer's residual; without: returns out. Outputs are new tensors in
    x's dtype (weight may be another float dtype; it is applied in float32)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 1, FLOAT_DTYPES)
    num_tokens, hidden = x.shape
    check_shape("weight", weight, (hidden,))
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        check_tensor("residual", residual, 2, (x.dtype,))
        check_shape("residual", residual, tuple(x.shape))
        tensors["residual"] = residual
    check_same_device(**tensors)
    check(hidden <= 65536, f"rms_norm handles rows up to 65536 elements, got {hidden}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_res = torch.empty_like(out) if residual is not None else out
    if num_tokens:
        block_n = next_pow2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x, residual if residual is not None else x, weight, out, new_res, eps, hidden,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), new_res.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=min(16, max(1, block_n // 256)),
        )
    return out if residual is None else (out, new_res)
