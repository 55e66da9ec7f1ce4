"""Tensor-parallel linear layers.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that takes the full
checkpoint tensor and copies this rank's slice into the parameter, so the loader never needs to
know how a layer is sharded. Column-parallel layers split the output features across ranks,
row-parallel layers split the input features and sum the partial outputs with an all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels import f32_linear_cpu
from services.worker.distributed import tp_all_gather, tp_all_reduce, tp_rank, tp_size

WeightLoader = Callable[..., None]


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint slice into a parameter (slice), checking the shape and kind first."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(dst.shape)}, checkpoint {tuple(src.shape)}")
    if not src.is_floating_point() and src.dtype != dst.dtype:  # quantized weights need a quantized layer
        raise ValueError(f"checkpoint tensor has dtype {src.dtype}; this parameter takes floating-point weights")
    dst.copy_(src)


def check_shape(loaded_weight: torch.Tensor, *expected: int) -> None:
    """The full (unsharded) checkpoint tensor must have the shape the layer was built for."""
    if tuple(loaded_weight.shape) != expected:
        raise ValueError(f"shape mismatch: checkpoint {tuple(loaded_weight.shape)}, model expects {expected}")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """A replicated parameter: the checkpoint tensor as is."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter takes no shard id, got {shard_id!r}")
    copy_weight(param.data, loaded_weight)


def make_param(*shape: int, weight_loader: WeightLoader) -> nn.Parameter:
    """An uninitialized inference parameter (default dtype and device) with its weight_loader."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts})")
    return total // parts


class _Linear(nn.Module):
    """y = x W^T + b over this rank's (local) weight [out_local, in_local].

    quant: set when the weight is quantized (services/worker/quant); it computes x W^T (+ b).
    lora: set by the LoRA manager (services/worker/lora) when adapters are enabled; it adds each
    row's adapter delta to the output (before a row-parallel all-reduce, which sums it too)."""

    quant: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, in_local: int, out_local: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.in_local, self.out_local = in_local, out_local  # a packed quantized weight has other shapes
        self.weight = make_param(out_local, in_local, weight_loader=self.weight_loader)
        bias_param = make_param(out_local, weight_loader=self.weight_loader) if bias else None
        self.register_parameter("bias", bias_param)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return f32_linear_cpu.linear(x, self.weight, bias) if self.quant is None else self.quant(x, bias)

    def output_shard(self, shard_id: object = None) -> tuple[int, int, int, int]:
        """(offset in this rank's output, rows, first row in the full tensor, full rows) of an
        output shard; a replicated layer keeps every row."""
        rows = self.weight.shape[0]
        return 0, rows, 0, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        return y if self.lora is None else self.lora(x, y)


class ReplicatedLinear(_Linear):
    """The full weight on every rank (small projections)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True):
        super().__init__(input_size, output_size, bias)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; gather_output=True returns the full output on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output size"), bias)
        self.gather_output = gather_output

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        check_shape(loaded_weight, size * self.tp_size, *param.shape[1:])
        default_weight_loader(param, loaded_weight.narrow(0, self.tp_rank * size, size), shard_id)

    def output_shard(self, shard_id: object = None) -> tuple[int, int, int, int]:
        size = self.weight.shape[0]
        return 0, size, self.tp_rank * size, size * self.tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return tp_all_gather(y, dim=-1) if self.gather_output and self.tp_size > 1 else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one weight (gate_up_proj: shard ids 0 and 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True):
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = [divide(size, self.tp_size, "output size") for size in output_sizes]

    def output_shard(self, shard_id: object = None) -> tuple[int, int, int, int]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard id must be an index below {len(self.output_sizes)}, got {shard_id!r}")
        size = self.output_sizes[shard_id]
        return sum(self.output_sizes[:shard_id]), size, self.tp_rank * size, size * self.tp_size

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        _load_output_shard(self, param, loaded_weight, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection (shard ids "q", "k", "v"), split by attention heads.

    With fewer KV heads than ranks each rank keeps one KV head, replicated over
    tp_size // total_num_kv_heads consecutive ranks.
    """

    def __init__(
        self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int, bias: bool = False
    ):
        size = tp_size()
        num_heads = divide(total_num_heads, size, "number of attention heads")
        if total_num_kv_heads >= size:
            num_kv_heads = divide(total_num_kv_heads, size, "number of KV heads")
        elif size % total_num_kv_heads:
            raise ValueError(f"{total_num_kv_heads} KV heads cannot be replicated evenly over {size} ranks")
        else:
            num_kv_heads = 1
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_size * size, bias)
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.kv_head_start = self.tp_rank * total_num_kv_heads // size  # first KV head of this rank
        self.output_sizes = [num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size]

    def output_shard(self, shard_id: object = None) -> tuple[int, int, int, int]:
        q_size, kv_size, _ = self.output_sizes
        if shard_id == "q":
            return 0, q_size, self.tp_rank * q_size, self.total_num_heads * self.head_size
        if shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            return offset, kv_size, self.kv_head_start * self.head_size, self.total_num_kv_heads * self.head_size
        raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        _load_output_shard(self, param, loaded_weight, shard_id)


def _load_output_shard(layer: ColumnParallelLinear, param: torch.Tensor, loaded_weight: torch.Tensor,
                       shard_id: object) -> None:
    """Copy this rank's rows of one output shard (q/k/v, gate/up) of a fused layer."""
    offset, size, start, total = layer.output_shard(shard_id)
    check_shape(loaded_weight, total, *param.shape[1:])
    copy_weight(param.data.narrow(0, offset, size), loaded_weight.narrow(0, start, size))


class RowParallelLinear(_Linear):
    """Input features split across ranks (the input is already this rank's share); the partial
    outputs are summed with an all-reduce and the bias is added once, after it."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True):
        super().__init__(divide(input_size, tp_size(), "input size"), output_size, bias)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            check_shape(loaded_weight, param.shape[0], size * self.tp_size)
            loaded_weight = loaded_weight.narrow(1, self.tp_rank * size, size)
        default_weight_loader(param, loaded_weight, shard_id)

    def input_shard(self) -> tuple[int, int]:
        """(first input column in the full tensor, columns) of this rank's share."""
        size = self.weight.shape[1]
        return self.tp_rank * size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        y = self.matmul(x, None)
        y = tp_all_reduce(y if self.lora is None else self.lora(x, y))
        return y if self.bias is None else y + self.bias
