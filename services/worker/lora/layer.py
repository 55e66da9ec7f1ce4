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

import numpy as np
import torch

from services.worker.forward_context import current_lora, use_triton_kernels
from services.worker.layers.linear import RowParallelLinear, _Linear
from services.worker.lora.adapter import Parts


@dataclass
class LoRAMapping:
    """A step's adapter rows, grouped by slot once per step and reused by every LoRA layer.

    segments: (slot, start, end), one per slot with rows. With perm None each slot's rows are one
    contiguous run of the batch and start:end index the batch itself (no copy); otherwise perm
    holds the adapter rows sorted by slot (stably) and start:end index that order: each layer
    gathers its rows once, runs one dense matmul pair per slot, and copies them back once.
    """

    segments: list[tuple[int, int, int]]
    perm: torch.Tensor | None  # [rows using an adapter] int64 on the device, or None (see above)
    token_slots: torch.Tensor  # [T] int32 on the device: each row's slot, -1 for the base model (Triton path)

    @classmethod
    def from_slots(cls, token_slots: list[int], device: torch.device) -> LoRAMapping | None:
        """The mapping of a step whose row t runs slot token_slots[t] (-1: the base model); None
        when no row uses an adapter."""
        slots = np.asarray(token_slots, dtype=np.int64)
        rows = np.flatnonzero(slots >= 0)
        if rows.size == 0:
            return None
        order = rows[np.argsort(slots[rows], kind="stable")]
        starts = np.flatnonzero(np.diff(slots[order], prepend=-1))  # where each slot's run begins
        ends = np.append(starts[1:], order.size)
        used = slots[order[starts]].tolist()
        token_tensor = torch.tensor(token_slots, dtype=torch.int32, device=device)
        first, last = order[starts], order[ends - 1]
        if np.all(last - first == ends - 1 - starts):  # each slot's rows are one run of the batch
            return cls(list(zip(used, first.tolist(), (last + 1).tolist())), None, token_tensor)
        perm = torch.from_numpy(order).to(device)
        return cls(list(zip(used, starts.tolist(), ends.tolist())), perm, token_tensor)


def lora_delta_torch(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     mapping: LoRAMapping) -> torch.Tensor:
    """y[rows of slot s] += x[rows] A[s]^T B[s]^T for every slot with rows (in place): one
    shrink and one expand matmul per adapter in the step, on contiguous rows."""
    if mapping.perm is None:
        for slot, start, end in mapping.segments:
            y[start:end].addmm_(x[start:end] @ a[slot].t(), b[slot].t())
        return y
    # gather, add per slot, copy back: rows are unique, and index_add_ is a slow scatter on CPU
    xs, ys = x.index_select(0, mapping.perm), y.index_select(0, mapping.perm)
    for slot, start, end in mapping.segments:
        ys[start:end].addmm_(xs[start:end] @ a[slot].t(), b[slot].t())
    return y.index_copy_(0, mapping.perm, ys)


class LoRALayer:
    """Attached as `layer.lora`; adds the step's adapters' deltas to the layer's output."""

    def __init__(self, layer: _Linear, shard_ids: list[object], max_rank: int, num_slots: int, dtype: torch.dtype):
        """dtype: the model's compute dtype (a quantized layer's weight is int8)."""
        self.layer, self.shard_ids, self.rank = layer, shard_ids, max_rank
        out_local, in_local = layer.out_local, layer.in_local
        total = len(shard_ids) * max_rank
        kw = {"dtype": dtype, "device": next(layer.parameters()).device}
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
