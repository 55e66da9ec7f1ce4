"""Grouped 4/8-bit weight GEMM (GPTQ / AWQ, W4A16 and W8A16) on the GPU: y = x @ W^T (+ bias).

x [M, K] in float16 / bfloat16 / float32; the weight as in kernels/packed_int.py: qweight
[K // (32 // BITS), N] int32 packed along K in order (GPTQ's layout; AWQ's is repacked at load),
zeros [G, N] int32 and scales [G, N] float32 per group, g_idx [K] int32. Each program computes a
[BLOCK_M, BLOCK_N] tile: it reads a [BLOCK_K // (32 // BITS), BLOCK_N] block of words, shifts each
input row's code out of its word, subtracts the zero point and multiplies by the scale of that
row's group (looked up through g_idx, so act-order checkpoints need no reordering), then feeds the
tile to tl.dot in x's dtype with float32 accumulation. The weights are read in 4 (8) bits each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_shape, check_tensor
from kernels.packed_int import _check_bits, packed_int_linear_ref

__all__ = ["packed_int_linear_ref", "packed_int_linear_triton"]


@triton.jit
def _packed_int_linear_kernel(
    x_ptr, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_om,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols[None, :] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok
        words = tl.load(w_ptr + (ks // PER_WORD)[:, None].to(tl.int64) * N + cols[None, :], mask=w_mask, other=0)
        codes = (words >> ((ks % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)
        groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0)[:, None].to(tl.int64) * N + cols[None, :]
        zeros = tl.load(zeros_ptr + groups, mask=w_mask, other=0)
        scales = tl.load(scales_ptr + groups, mask=w_mask, other=0.0)
        w = ((codes - zeros).to(tl.float32) * scales).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & col_ok
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def packed_int_linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    bits: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] times the packed weight (kernels/packed_int.py's layout) (+ bias [N]) -> [..., N]."""
    per_word = _check_bits(bits)
    check_tensor("qweight", qweight, 2, (torch.int32,))
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    rows = x.reshape(-1, x.shape[-1])
    check_tensor("x", rows, 2, FLOAT_DTYPES)
    check_shape("x", rows, (rows.shape[0], k))
    check_tensor("zeros", zeros, 2, (torch.int32,))
    check_tensor("scales", scales, 2, (torch.float32,))
    check_shape("scales", scales, zeros.shape)
    check(zeros.shape[1] == n, f"zeros and scales must have {n} columns, got {zeros.shape[1]}")
    check_tensor("g_idx", g_idx, 1, (torch.int32,))
    check_shape("g_idx", g_idx, (k,))
    check(qweight.is_contiguous() and zeros.is_contiguous() and scales.is_contiguous(),
          "qweight, zeros and scales must be contiguous")
    if bias is not None:
        check_shape("bias", bias, (n,))
        check(bias.is_contiguous(), "bias must be contiguous")
    check_same_device(x=rows, qweight=qweight, zeros=zeros, scales=scales, g_idx=g_idx)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        # float32 tiles take twice the registers: smaller ones keep them from spilling
        block_m = 16 if rows.shape[0] <= 16 else (32 if x.dtype == torch.float32 else 64)
        block_nk = 32 if x.dtype == torch.float32 else 64
        grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(n, block_nk))
        _packed_int_linear_kernel[grid](
            rows, qweight, zeros, scales, g_idx, bias if bias is not None else scales, out, rows.shape[0], n, k,
            rows.stride(0), out.stride(0),
            BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_nk, BLOCK_K=block_nk,
            IEEE=x.dtype == torch.float32,
        )
    return out.view(*x.shape[:-1], n)
