"""FP8 KV cache storage: the torch dtype of a kv_cache_dtype name, and the quantize / dequantize
steps every backend shares.

A cached value x is stored as fp8(clamp(x / scale)) and read back as fp8 * scale, with one scale
for the keys and one for the values of each layer (Attention.k_scale / v_scale). fp8 keeps about
the same relative precision over its whole range, so the scale only has to keep values inside it.
A cache in the model's own dtype ignores the scales.
"""

from __future__ import annotations

import torch

from kernels import kv_write_cpu

FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache tensors' dtype for CacheConfig.kv_cache_dtype (auto: the model's)."""
    if name == "auto":
        return model_dtype
    if name not in FP8_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {tuple(FP8_DTYPES)}, got {name!r}")
    return FP8_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in fp8 `dtype`, saturating at its largest finite value instead of overflowing."""
    limit = fp8_max(dtype)
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) * scale


def write_cache(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """Store x [T, Hkv, D] at slots of one half (keys or values) of a layer's cache
    [num_blocks, block_size, Hkv, D], quantizing when the cache is fp8."""
    heads, dim = x.shape[1], x.shape[2]
    if not is_fp8(cache.dtype):
        cache.view(-1, heads, dim).index_copy_(0, slots, x)
        return
    if kv_write_cpu.usable(cache, x):
        kv_write_cpu.write(cache, slots, x, scale)
        return
    # index_copy_ has no fp8 kernel on CPU: copy the bytes
    quantized = quantize(x, scale, cache.dtype).view(torch.uint8)
    cache.view(torch.uint8).view(-1, heads, dim).index_copy_(0, slots, quantized)


def read_cache(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached values (gathered) in the model's dtype."""
    return dequantize(values, scale, dtype) if is_fp8(values.dtype) else values


def check_kv_cache_dtype(name: str, backend: str, device: torch.device) -> None:
    """Fail at startup when the attention kernels cannot use this cache dtype on this device:
    Triton converts fp8_e4m3 on CUDA compute capability 8.9 and later only."""
    if FP8_DTYPES.get(name) != torch.float8_e4m3fn or backend != "triton" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(
            f"kv_cache_dtype {name} needs a GPU of compute capability 8.9 or later for the triton kernels; "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor} (use fp8_e5m2 or auto)"
        )
