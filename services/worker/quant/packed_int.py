"""GPTQ and AWQ checkpoints (grouped 4/8-bit weights, packed in int32 words): what the linear layers
hold while the checkpoint loads, and how they multiply afterwards.

The formats differ only in how the words are laid out (services/worker/quant/gptq.py, awq.py give a
PackedFormat that converts each checkpoint tensor). While loading, a layer holds its weight
unpacked in its own orientation, so the usual tensor-parallel weight loaders shard it:
weight [N, K_local] uint8 codes (the checkpoint's qweight), qzeros [N, G] int32, scales [N, G]
float32 and g_idx [K_local] int32 (the group of each input column: the checkpoint's under GPTQ,
k // group_size under AWQ). A row-parallel layer keeps every group on every rank and the g_idx
of its own columns.

After loading, on CPU the weight is dequantized once into the model's dtype,
W = (code - zero[g_idx]) * scale[g_idx]: the correct baseline, running the float matmul (no
weight memory saved). On CUDA the codes are repacked in GPTQ's layout and the Triton kernel
(kernels/packed_int_linear.py) dequantizes tiles on the fly, reading 4 (8) bits per weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from kernels.packed_int import dequantize, pack_int32
from services.worker.layers.linear import RowParallelLinear, _Linear, check_shape, default_weight_loader

Convert = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PackedFormat:
    """A checkpoint's packing: bits per weight, input columns per group (-1: one group over all
    columns), and for each of the layer's tensors the conversion from the checkpoint's layout."""

    method: str
    bits: int
    group_size: int
    convert: dict[str, Convert]  # "weight" (the checkpoint's qweight), "qzeros", "scales", "g_idx" when stored


def _groups(layer: _Linear, group_size: int) -> int:
    full_k = layer.weight.shape[1] * (layer.tp_size if isinstance(layer, RowParallelLinear) else 1)
    if group_size == -1:
        return 1
    if full_k % group_size:
        raise ValueError(f"input size {full_k} is not a multiple of the group size {group_size}")
    return full_k // group_size


def _param(layer: _Linear, shape: tuple[int, ...], dtype: torch.dtype, loader, convert: Convert) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype, device=layer.weight.device), requires_grad=False)
    param.weight_loader = lambda p, tensor, shard_id=None: loader(p, convert(tensor), shard_id)
    return param


def _load_g_idx(layer: _Linear, groups: int, param: torch.Tensor, tensor: torch.Tensor, shard_id: object) -> None:
    """This rank's columns' groups; the shards of a fused layer (q, k, v) must agree."""
    if tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"g_idx must be an integer tensor, got {tensor.dtype}")
    if isinstance(layer, RowParallelLinear):
        start, size = layer.input_shard()
        check_shape(tensor, size * layer.tp_size)
        tensor = tensor.narrow(0, start, size)
    check_shape(tensor, param.shape[0])
    if tensor.numel() and (tensor.min() < 0 or tensor.max() >= groups):
        raise ValueError(f"g_idx names groups outside 0 .. {groups - 1}")
    if getattr(layer, "g_idx_loaded", False) and not torch.equal(param.data, tensor.to(torch.int32)):
        raise ValueError("the fused projections' g_idx differ (their input columns must share groups)")
    param.data.copy_(tensor)
    layer.g_idx_loaded = True


def prepare_layers(model: nn.Module, fmt: PackedFormat) -> None:
    """Give every linear layer the unpacked tensors to load the checkpoint's into."""
    for layer in model.modules():
        if not isinstance(layer, _Linear):
            continue
        n, k = layer.weight.shape
        groups = _groups(layer, fmt.group_size)
        layer.compute_dtype = layer.weight.dtype
        # a row-parallel layer's groups are all on every rank; a column-parallel one splits its rows
        group_loader = default_weight_loader if isinstance(layer, RowParallelLinear) else layer.weight_loader
        layer.weight = _param(layer, (n, k), torch.uint8, layer.weight_loader, fmt.convert["weight"])
        layer.qzeros = _param(layer, (n, groups), torch.int32, group_loader, fmt.convert["qzeros"])
        layer.scales = _param(layer, (n, groups), torch.float32, group_loader, fmt.convert["scales"])
        if "g_idx" in fmt.convert:
            layer.g_idx = _param(layer, (k,), torch.int32, partial(_load_g_idx, layer, groups), fmt.convert["g_idx"])
        else:  # consecutive groups of group_size columns
            start = layer.input_shard()[0] if isinstance(layer, RowParallelLinear) else 0
            columns = torch.arange(start, start + k, device=layer.weight.device)
            g_idx = columns // fmt.group_size if fmt.group_size > 0 else torch.zeros_like(columns)
            layer.register_buffer("g_idx", g_idx.to(torch.int32), persistent=False)
    # the checkpoint's qweight loads into weight (the codes), so weight keeps the layer's shape
    model.renamed_modules = {**getattr(model, "renamed_modules", {}), "qweight": "weight"}


class PackedIntWeights:
    """A layer's repacked weight (GPTQ's layout, kernels/packed_int.py) and the kernel that uses it."""

    def __init__(self, layer: _Linear, bits: int):
        self.layer, self.bits = layer, bits

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from kernels.packed_int_linear import packed_int_linear_triton

        layer = self.layer
        return packed_int_linear_triton(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, self.bits, bias)


def finish_layers(model: nn.Module, fmt: PackedFormat) -> None:
    """After loading: dequantize once (CPU), or repack for the Triton kernel (CUDA)."""
    for layer in model.modules():
        if not isinstance(layer, _Linear):
            continue
        codes = layer.weight.data
        del layer.weight
        if codes.device.type != "cuda":
            weight = dequantize(codes, layer.qzeros.data, layer.scales.data, layer.g_idx).to(layer.compute_dtype)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            del layer.qzeros, layer.scales, layer.g_idx
            continue
        layer.qweight = nn.Parameter(pack_int32(codes.t(), fmt.bits, dim=0), requires_grad=False)
        layer.qzeros = nn.Parameter(layer.qzeros.data.t().contiguous(), requires_grad=False)
        layer.scales = nn.Parameter(layer.scales.data.t().contiguous(), requires_grad=False)
        layer.quant = PackedIntWeights(layer, fmt.bits)
