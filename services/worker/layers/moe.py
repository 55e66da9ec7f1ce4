"""Mixture-of-experts MLP: a router picks top_k of num_experts SwiGLU experts per token.

Every expert's weights live in two stacked parameters: w13_weight [E, 2 * I_local, H] (gate rows
then up rows) and w2_weight [E, H, I_local]. Under tensor parallelism each expert is split like a
column/row-parallel pair (this rank holds I_local = I / tp of its intermediate features) and the
partial outputs are summed with one all-reduce. The checkpoint's per-expert tensors arrive with
shard id (expert, 0 | 1) for gate/up and (expert, None) for down.

With the Triton backend the experts run as two grouped GEMMs over the pairs sorted by expert
(kernels/fused_moe.py), on the device with no host sync, so MoE decode steps can replay CUDA
graphs. Otherwise the torch path groups tokens by expert on the host and runs one GEMM pair per
expert; the routing weights scale the results, which are summed per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.distributed import tp_all_reduce, tp_rank, tp_size
from services.worker.forward_context import use_triton_kernels
from services.worker.layers.linear import ReplicatedLinear, check_shape, copy_weight, divide, make_param


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.tp_rank, self.tp_size = hidden_size, tp_rank(), tp_size()
        self.inter = divide(intermediate_size, self.tp_size, "moe intermediate size")
        self.w13_weight = make_param(num_experts, 2 * self.inter, hidden_size, weight_loader=self.weight_loader)
        self.w2_weight = make_param(num_experts, hidden_size, self.inter, weight_loader=self.weight_loader)
        # what the loader must have seen for each parameter: every expert's gate, up and down
        self.w13_weight.required_shards = {(e, s) for e in range(num_experts) for s in (0, 1)}
        self.w2_weight.required_shards = {(e, None) for e in range(num_experts)}

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if not (isinstance(shard_id, tuple) and 0 <= shard_id[0] < self.num_experts):
            raise ValueError(f"an expert weight needs shard id (expert < {self.num_experts}, part), got {shard_id!r}")
        expert, part = shard_id
        n, full = self.inter, self.inter * self.tp_size
        if param is self.w13_weight:
            check_shape(loaded_weight, full, self.hidden_size)
            copy_weight(param.data[expert, part * n : (part + 1) * n], loaded_weight.narrow(0, self.tp_rank * n, n))
        else:
            check_shape(loaded_weight, self.hidden_size, full)
            copy_weight(param.data[expert], loaded_weight.narrow(1, self.tp_rank * n, n))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k] in float32, expert ids [T, top_k]): softmax over every expert,
        the top_k kept, renormalized to sum to one when the model asks for it."""
        weights, ids = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(router_logits)
        if use_triton_kernels():
            from kernels.fused_moe import fused_moe

            out = fused_moe(x, self.w13_weight, self.w2_weight, weights, ids)
        else:
            out = self._experts_torch(x, weights.to(x.dtype), ids)
        return out if self.tp_size == 1 else tp_all_reduce(out)

    def _experts_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        order = ids.flatten().argsort()  # (token, slot) pairs grouped by expert
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        tokens, start = order // self.top_k, 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows, picked = tokens[start : start + count], order[start : start + count]
            gate, up = F.linear(x[rows], self.w13_weight[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2_weight[expert])
            out.index_add_(0, rows, y * weights.flatten()[picked, None])
            start += count
        return out


class SparseMoeBlock(nn.Module):
    """The routed MLP of a decoder layer: a linear router (`gate`, replicated) over the experts."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
