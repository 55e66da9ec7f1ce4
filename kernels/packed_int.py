"""Grouped 4/8-bit weights packed into int32 words (the GPTQ and AWQ checkpoint layouts), in torch:
packing, unpacking, dequantization and the reference matmul the Triton kernel
(kernels/packed_int_linear.py) is tested against.

A word holds 32 // bits codes; code j of a word sits at bits j*bits .. j*bits+bits-1. A word packs
consecutive elements along one dimension, in order (GPTQ) or permuted (AWQ's [0, 2, 4, 6, 1, 3, 5, 7]:
the code at position j of the word is element order[j] of its run of 8).

Dequantized weight W[n, k] = (code[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]]: each input
column k belongs to the group g_idx[k] (k // group_size, or any permutation's grouping under GPTQ's
act-order), and each (output row, group) has its own zero point and scale.
"""

from __future__ import annotations

import torch

BITS = (4, 8)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"packed weights of {bits} bits are not supported; supported: {BITS}")
    return 32 // bits


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words -> int32 codes in 0 .. 2**bits - 1, 32 // bits per word along `dim`."""
    per = _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    words = packed.movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops the sign
    if order is not None:  # position j holds element order[j]: element i is at position inverse[i]
        codes = codes[..., torch.argsort(torch.tensor(order)).to(packed.device)]
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per).movedim(-1, dim)


def pack_int32(codes: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Codes in 0 .. 2**bits - 1 -> int32 words, 32 // bits per word along `dim` (unpack_int32's inverse)."""
    per = _check_bits(bits)
    values = codes.movedim(dim, -1).to(torch.int64)
    if values.shape[-1] % per:
        raise ValueError(f"cannot pack {values.shape[-1]} codes into words of {per}")
    if values.numel() and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"codes must lie in 0 .. {(1 << bits) - 1}")
    values = values.reshape(*values.shape[:-1], -1, per)
    if order is not None:
        values = values[..., torch.tensor(order, device=codes.device)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    words = (values << shifts).sum(-1)
    words = words - (words >> 31) * (1 << 32)  # the same 32 bits as a signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes [N, K], zeros and scales [N, G], g_idx [K] -> float32 weight [N, K]."""
    index = g_idx.long()
    return (codes.float() - zeros.float()[:, index]) * scales.float()[:, index]


def packed_int_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    bits: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] times the weight of qweight [K // (32 // bits), N] (packed along K, in order),
    zeros and scales [G, N], g_idx [K] (+ bias [N]) -> [..., N] in x's dtype."""
    codes = unpack_int32(qweight, bits, dim=0)
    weight = dequantize(codes.t(), zeros.t(), scales.t(), g_idx).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
