"""One linear layer's adapter slots, and the segmented LoRA matmul that applies them.

Slot s holds A [S, n*R, in_local] and B [S, out_local, n*R] for a layer fused from n projections
(q/k/v: 3, gate/up: 2, else 1), each sub-projection in its own R = max_lora_rank block, zero
where an adapter has a lower rank or does not target it. Shards follow the base layer: a
column-parallel layer keeps its output rows of B, a row-parallel one its input columns of A
(its partial deltas are summed by the layer's all-reduce, with the base output).


The torch path runs one shrink and one expand matmul per adapter in the step; with the Triton
kernel set (kernels/lora.py) one launch pair serves every adapter, each token reading its slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.forward_context import current_lora, use_triton_kernels
from services.worker.layers.linear import RowParallelLinear, _Linear
from services.worker.lora.adapter import Parts


@dataclass
class LoRAMapping:
    """A step's rows per adapter slot, for slots with rows: (slot, rows), rows a slice when they
    are contiguous (one request, or neighbours), else their indices on the device."""

    rows_by_slot: list[tuple[int, slice | torch.Tensor]]
    token_slots: torch.Tensor  # [T] int32 on the device: each row's slot, -1 for the base model (Triton path)


def lora_delta_torch(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     mapping: LoRAMapping) -> torch.Tensor:
    """y[rows of slot s] += x[rows] A[s]^T B[s]^T for every slot with rows (in place): one
    shrink and one expand matmul per adapter in the step."""
    for slot, rows in mapping.rows_by_slot:
        if isinstance(rows, slice):
            y[rows] += (x[rows] @ a[slot].t()) @ b[slot].t()
        else:
            y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].t()) @ b[slot].t())
    return y


class LoRALayer:
    """Attached as `layer.lora`; adds the step's adapters' deltas to the layer's output."""

    def __init__(self, layer: _Linear, shard_ids: list[object], max_rank: int, num_slots: int, dtype: torch.dtype):
        """dtype: the model's compute dtype (a quantized layer's weight is int8)."""
        self.layer, self.shard_ids, self.rank = layer, shard_ids, max_rank
        out_local, in_local = layer.weight.shape
        total = len(shard_ids) * max_rank
        kw = {"dtype": dtype, "device": layer.weight.device}
        self.a = torch.zeros(num_slots, total, in_local, **kw)
        self.b = torch.zeros(num_slots, out_local, total, **kw)

    def set_slot(self, slot: int, parts: Parts) -> None:
        """Copy this rank's share of an adapter's parts for this layer into a slot (zeros where none)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for shard, a, b in parts:
            i = self.shard_ids.index(shard) * self.rank
            r = a.shape[0]
            if isinstance(self.layer, RowParallelLinear):
                start, size = self.layer.input_shard()
                a = a.narrow(1, start, size)
                offset, rows, start = 0, b.shape[0], 0
            else:
                offset, rows, start, _ = self.layer.output_shard(shard)
            self.a[slot, i : i + r].copy_(a)
            self.b[slot, offset : offset + rows, i : i + r].copy_(b.narrow(0, start, rows))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mapping = current_lora()
        if mapping is None:
            return y
        if use_triton_kernels():  # the step's kernel set: one launch pair for every adapter
            from kernels.lora import lora_delta

            return lora_delta(x.contiguous(), y, self.a, self.b, mapping.token_slots)
        return lora_delta_torch(x, y, self.a, self.b, mapping)
