"""GPTQ and AWQ test checkpoints: a float weight quantized round-to-nearest in groups and written in
each format's documented layout (kernels/packed_int.py packs the words).

Not the GPTQ or AWQ algorithms (no calibration data here): only their file formats, which is what
a loader must read. GPTQ: qweight int32 [K / (32 / bits), N] packed along the input dimension,
qzeros [G, N / (32 / bits)] holding each zero point minus one (the classic format), scales [G, N]
float16, g_idx [K]; with act_order the columns are grouped by a seeded permutation, as desc_act
checkpoints are. AWQ: qweight [K, N / 8] and qzeros [G, N / 8] packed along the output dimension in
the order [0, 2, 4, 6, 1, 3, 5, 7], scales [G, N] float16, zero points stored as is.
"""

from __future__ import annotations

import torch

from kernels.packed_int import pack_int32
from services.worker.quant.awq import ORDER


def _group_index(k: int, group_size: int, act_order: bool, seed: int) -> torch.Tensor:
    size = k if group_size == -1 else group_size
    if not act_order:
        return torch.arange(k, dtype=torch.int32) // size
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // size
    return g_idx


def quantize_grouped(
    weight: torch.Tensor, bits: int, group_size: int, *, sym: bool, act_order: bool = False, min_zero: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> codes [N, K], zeros [N, G], float16 scales [N, G], g_idx [K] (round to nearest).
    Symmetric groups take the zero point 2**(bits-1); asymmetric ones span their min..max, with the
    zero point at least min_zero (the classic GPTQ format cannot store a zero point of 0)."""
    w = weight.float()
    g_idx = _group_index(w.shape[1], group_size, act_order, seed)
    groups, maxq = int(g_idx.max()) + 1, (1 << bits) - 1
    codes = torch.empty(w.shape, dtype=torch.int32)
    zeros = torch.empty(w.shape[0], groups, dtype=torch.int32)
    scales = torch.empty(w.shape[0], groups, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().view(-1)
        part = w[:, cols]
        if sym:
            scale = 2 * part.abs().amax(1) / maxq
            zero = torch.full((w.shape[0],), 1 << (bits - 1), dtype=torch.int32)
        else:
            low, high = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
            scale = (high - low) / maxq
            zero = torch.round(-low / torch.where(scale > 0, scale, 1)).to(torch.int32).clamp(min_zero, maxq)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16)
        codes[:, cols] = (torch.round(part / scale.float()[:, None]) + zero[:, None]).clamp(0, maxq).to(torch.int32)
        zeros[:, g], scales[:, g] = zero, scale
    return codes, zeros, scales, g_idx


def gptq_tensors(weight: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool) -> dict:
    """One layer's checkpoint tensors (suffixes) in the classic GPTQ format."""
    codes, zeros, scales, g_idx = quantize_grouped(weight, bits, group_size, sym=sym, act_order=act_order,
                                                   min_zero=1)
    return {"qweight": pack_int32(codes.t(), bits, dim=0), "qzeros": pack_int32((zeros - 1).t(), bits, dim=1),
            "scales": scales.t().contiguous(), "g_idx": g_idx}


def awq_tensors(weight: torch.Tensor, group_size: int) -> dict:
    """One layer's checkpoint tensors (suffixes) in AWQ's GEMM format."""
    codes, zeros, scales, _ = quantize_grouped(weight, 4, group_size, sym=False)
    return {"qweight": pack_int32(codes.t(), 4, dim=1, order=ORDER), "qzeros": pack_int32(zeros.t(), 4, dim=1, order=ORDER),
            "scales": scales.t().contiguous()}


def gptq_config(bits: int, group_size: int, sym: bool, act_order: bool) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
            "lm_head": False}


def awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
