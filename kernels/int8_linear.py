"""Weight-only int8 GEMM (W8A16) on the GPU: y = x @ (w * scale)^T (+ bias).

x [M, K] in float16 / bfloat16 / float32, w [N, K] int8, scale [N] float32 (one per output row),
bias [N] or None. Each program computes a [BLOCK_M, BLOCK_N] tile: int8 weight tiles are widened to
x's dtype in registers and fed to tl.dot with float32 accumulation; the per-row scale multiplies
the accumulator once at the end. The weights are read in a quarter of float32's bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor
from kernels.int8_linear_cpu import int8_linear_ref

__all__ = ["int8_linear_ref", "int8_linear_triton"]


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0)
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def int8_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] times int8 weight [N, K] with per-row float32 scale [N] (+ bias [N]) -> [..., N]."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    check_tensor("x", rows, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 2, (torch.int8,))
    check_tensor("scale", scale, 1, (torch.float32,))
    check_shape("scale", scale, (n,))
    if bias is not None:
        check_shape("bias", bias, (n,))
        check(bias.is_contiguous(), "bias must be contiguous")
    check_same_device(x=rows, weight=weight, scale=scale)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block_m = 16 if rows.shape[0] <= 16 else 64
        grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(n, 64))
        _int8_linear_kernel[grid](
            rows, weight, scale, bias if bias is not None else scale, out, rows.shape[0], n, k,
            rows.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, IEEE=x.dtype == torch.float32,
        )
    return out.view(*x.shape[:-1], n)
