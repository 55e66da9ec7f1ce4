"""Neox-style rotary position embedding over flattened q/k, driven by a precomputed cos/sin cache.

The cache is [max_position, rot_dim] with cos in the first rot_dim/2 columns and sin in the
rest; rot_dim is the head size. Scaled variants (Llama 3) only change how the cache is built,
so one kernel serves them all. Within a head, element i < rot_dim/2 pairs with i + rot_dim/2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check, check_same_device, check_tensor, next_pow2


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, stride_src, stride_dst, num_heads, cos, sin, half, head_dim,
                  H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < half)
    off = heads[:, None] * head_dim + cols[None, :]
    x1 = tl.load(src_ptr + token * stride_src + off, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + token * stride_src + off + half, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    y1 = x1f * cos[None, :] - x2f * sin[None, :]
    y2 = x2f * cos[None, :] + x1f * sin[None, :]
    tl.store(dst_ptr + token * stride_dst + off, y1.to(x1.dtype), mask=mask)
    tl.store(dst_ptr + token * stride_dst + off + half, y2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cache_ptr,
    stride_q, stride_k, stride_qo, stride_ko, stride_cache,
    num_heads, num_kv_heads, head_dim,
    H_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    half = head_dim // 2
    cols = tl.arange(0, HALF_PAD)
    cmask = cols < half
    cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + cols, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_q, stride_qo, num_heads, cos, sin, half, head_dim, H_PAD, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_k, stride_ko, num_kv_heads, cos, sin, half, head_dim,
                  HKV_PAD, HALF_PAD)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3 frequency scaling: wavelengths longer than original_max / low_freq_factor are
    stretched by factor, those shorter than original_max / high_freq_factor are kept, and the
    band in between blends the two linearly in original_max / wavelength."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The float64 [head_dim / 2] rotation frequencies for default rope or, with
    scaling={"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (HF rope_scaling), Llama 3 scaled rope."""
    check(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
    return inv_freq


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float = 10000.0,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The float32 [max_position, head_dim] cos/sin cache (angles in float64) for rope_inv_freq."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=torch.float32)


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: returns rotated copies of q [T, H*D] and k [T, Hkv*D] (float32 math)."""
    head_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, D/2] each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.float().view(x.shape[0], -1, head_dim)
        x1, x2 = heads.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).view(x.shape).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    inplace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H*D] and k [T, Hkv*D] at positions [T] (int32/int64) with the neox layout.

    D = cos_sin_cache.shape[1]. Rows may be strided (views into a fused qkv output) but each row
    must be contiguous. With inplace=True q and k are updated and returned; otherwise new tensors
    are returned and the inputs are untouched.
    """
    check_tensor("positions", positions, 1, (torch.int32, torch.int64))
    check_tensor("q", q, 2, FLOAT_DTYPES)
    check_tensor("k", k, 2, (q.dtype,))
    check_tensor("cos_sin_cache", cos_sin_cache, 2, FLOAT_DTYPES)
    num_tokens, head_dim = q.shape[0], cos_sin_cache.shape[1]
    check(head_dim % 2 == 0, f"cos_sin_cache width (head_dim) must be even, got {head_dim}")
    check(positions.shape[0] == num_tokens and k.shape[0] == num_tokens,
          f"positions, q and k must have the same number of tokens, got "
          f"{positions.shape[0]}, {num_tokens}, {k.shape[0]}")
    check(q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0,
          f"q and k widths ({q.shape[1]}, {k.shape[1]}) must be multiples of head_dim {head_dim}")
    check_same_device(positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = k if inplace else torch.empty_like(k, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out, k_out
    num_heads, num_kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    _rotary_kernel[(num_tokens,)](
        positions, q, k, q_out, k_out, cos_sin_cache,
        q.stride(0), k.stride(0), q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0),
        num_heads, num_kv_heads, head_dim,
        H_PAD=next_pow2(num_heads), HKV_PAD=next_pow2(num_kv_heads), HALF_PAD=next_pow2(head_dim // 2),
    )
    return q_out, k_out
