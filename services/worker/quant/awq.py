"""AWQ checkpoints (AutoAWQ, llm-awq), quant_method "awq", version "gemm": grouped 4-bit weights.

Per linear layer the checkpoint holds qweight int32 [K, N / 8] (the codes packed along the output
dimension, eight per word in AWQ's interleaved order: word position j holds column ORDER[j] of its
run of eight), qzeros int32 [G, N / 8] (packed the same way, stored as is), scales [G, N]
(float16), G = K / group_size. W[n, k] = (q[k, n] - z[k // group_size, n]) * scales[k // group_size, n].
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.packed_int import unpack_int32
from services.worker.quant.packed_int import PackedFormat

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((config[key] for key in keys if key in config), default)


def packed_format(config: dict[str, Any]) -> PackedFormat:
    """The packing an AWQ quantization_config describes; what pagedserve does not run fails, named."""
    bits, group_size = _get(config, "bits", "w_bit"), _get(config, "group_size", "q_group_size", default=-1)
    if bits != 4:
        raise ValueError(f"awq with bits={bits!r} is not supported; supported: 4")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"awq group_size must be a positive integer or -1, got {group_size!r}")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq version {version!r} is not supported; supported: 'gemm'")
    if not config.get("zero_point", True):
        raise ValueError("awq without zero points (zero_point: false) is not supported")
    skipped = [name for name in config.get("modules_to_not_convert") or [] if name != "lm_head"]
    if skipped:
        raise ValueError(f"awq modules_to_not_convert {skipped[:5]} are not supported (only lm_head)")
    return PackedFormat("awq", 4, group_size, {
        "weight": lambda t: unpack_int32(t, 4, dim=1, order=ORDER).t().to(torch.uint8),
        "qzeros": lambda t: unpack_int32(t, 4, dim=1, order=ORDER).t(),
        "scales": lambda t: t.t(),
    })
