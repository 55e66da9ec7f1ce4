"""Scatter this step's keys and values into the paged KV cache.

kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (index 0 keys, 1 values). Token t
goes to slot slot_mapping[t] = block_id * block_size + offset; a negative slot marks a padding
token that is skipped. An fp8 cache stores key / k_scale and value / v_scale, saturated at the
fp8 type's largest finite value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    check,
    check_same_device,
    check_shape,
    check_tensor,
    fp8_limit,
    next_pow2,
)
from kernels._paged_tile import kv_scales


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cblk, stride_coff, stride_ch,
    block_size, num_kv_heads, head_dim, k_scale, v_scale,
    HKV_PAD: tl.constexpr, D_PAD: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, HKV_PAD)
    dims = tl.arange(0, D_PAD)
    live_heads = tl.where(slot >= 0, num_kv_heads, 0)  # a padding token writes nothing
    mask = (heads[:, None] < live_heads) & (dims[None, :] < head_dim)
    t64 = t.to(tl.int64)
    key = tl.load(k_ptr + t64 * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    val = tl.load(v_ptr + t64 * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    safe_slot = tl.maximum(slot, 0)  # masked lanes still form an address; keep it in range
    base = (safe_slot // block_size) * stride_cblk + (safe_slot % block_size) * stride_coff
    dst = cache_ptr + base + heads[:, None] * stride_ch + dims[None, :]
    if FP8_MAX > 0:  # an fp8 cache: scale and saturate (a plain cast would overflow)
        key = tl.clamp(key.to(tl.float32) / k_scale, -FP8_MAX, FP8_MAX)
        val = tl.clamp(val.to(tl.float32) / v_scale, -FP8_MAX, FP8_MAX)
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, val.to(cache_ptr.dtype.element_ty), mask=mask)


def kv_cache_write_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Torch reference: the same scatter (the torch backend's) over the valid (non-negative) slots."""
    from services.worker.quant.kv_fp8 import write_cache

    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    cast = kv_cache.dtype if kv_cache.dtype not in FP8_DTYPES else k.dtype  # fp8: quantized by write_cache
    write_cache(kv_cache[0], slots, k[valid].to(cast), k_scale)
    write_cache(kv_cache[1], slots, v[valid].to(cast), v_scale)


def kv_cache_write(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Write k, v ([T, Hkv, D]) into kv_cache in place at slot_mapping ([T] int64, <0 = skip);
    an fp8 kv_cache stores k / k_scale and v / v_scale (other caches ignore the scales).

    k and v may be strided views (e.g. slices of a fused qkv output) as long as the head_dim is
    contiguous; the cache must be contiguous within each slot ([Hkv, D] row-major).
    """
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, 5, FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,))
    num_tokens, num_kv_heads, head_dim = k.shape
    check_shape("v", v, tuple(k.shape))
    check(
        kv_cache.shape[0] == 2 and tuple(kv_cache.shape[3:]) == (num_kv_heads, head_dim),
        f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], got {tuple(kv_cache.shape)}",
    )
    check(kv_cache.stride(3) == head_dim, f"kv_cache heads must be contiguous, got strides {kv_cache.stride()}")
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_same_device(k=k, v=v, kv_cache=kv_cache, slot_mapping=slot_mapping)
    k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], num_kv_heads, head_dim, k_scale, v_scale,
        HKV_PAD=next_pow2(num_kv_heads), D_PAD=next_pow2(head_dim), FP8_MAX=fp8_limit(kv_cache.dtype),
    )
