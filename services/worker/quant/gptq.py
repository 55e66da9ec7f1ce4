"""GPTQ checkpoints (AutoGPTQ / GPTQModel), quant_method "gptq": grouped 4- or 8-bit integer weights.

Per linear layer the checkpoint holds qweight int32 [K / (32 / bits), N] (the codes packed along
the input dimension, in order), qzeros int32 [G, N / (32 / bits)] (zero points packed along the
output dimension), scales [G, N] (float16) and g_idx int32 [K] (the group of each input column:
k // group_size, or act-order's grouping when desc_act is true), G = K / group_size (1 when
group_size is -1). W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]). The classic format
(checkpoint_format "gptq", the default) stores each zero point minus one, so z = stored + 1;
"gptq_v2" stores it as is. sym only says how the zeros were chosen (2**(bits-1) when symmetric):
the stored zeros are used either way.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.packed_int import BITS, unpack_int32
from services.worker.quant.packed_int import PackedFormat

CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # the zero-point offset each stores


def packed_format(config: dict[str, Any]) -> PackedFormat:
    """The packing a GPTQ quantization_config describes; what pagedserve does not run fails, named."""
    bits, group_size = config.get("bits"), config.get("group_size", -1)
    if bits not in BITS:
        raise ValueError(f"gptq with bits={bits!r} is not supported; supported: {BITS}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"gptq group_size must be a positive integer or -1, got {group_size!r}")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"gptq checkpoint_format {checkpoint_format!r} is not supported; "
                         f"supported: {tuple(CHECKPOINT_FORMATS)}")
    if config.get("lm_head"):
        raise ValueError("gptq with a quantized LM head (lm_head: true) is not supported")
    if config.get("dynamic"):
        raise ValueError("gptq per-module overrides (dynamic) are not supported")
    offset = CHECKPOINT_FORMATS[checkpoint_format]
    return PackedFormat("gptq", bits, group_size, {
        "weight": lambda t: unpack_int32(t, bits, dim=0).t().to(torch.uint8),
        "qzeros": lambda t: (unpack_int32(t, bits, dim=1) + offset).t(),
        "scales": lambda t: t.t(),
        "g_idx": lambda t: t,
    })
