"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with routed SwiGLU experts in the layers
that decoder_sparse_step and mlp_only_layers select, dense MLPs in the rest; the top-k routing
weights are renormalized when norm_topk_prob is set."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from services.worker.layers.moe import SparseMoeBlock
from services.worker.models.llama import LlamaMLP
from services.worker.models.qwen3 import Qwen3ForCausalLM
from shared.config import ModelConfig


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    expert_mapping: ClassVar[dict[str, tuple[str, object]]] = {
        "gate_proj": ("w13_weight", 0), "up_proj": ("w13_weight", 1), "down_proj": ("w2_weight", None),
    }

    @staticmethod
    def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
        hf = config.hf_config
        step = hf.get("decoder_sparse_step", 1)
        experts = hf.get("num_experts") or hf.get("num_local_experts", 0)  # newer configs use the latter
        if layer_idx in hf.get("mlp_only_layers", []) or experts == 0 or (layer_idx + 1) % step:
            return LlamaMLP(config)
        return SparseMoeBlock(
            experts, hf["num_experts_per_tok"], config.hidden_size, hf["moe_intermediate_size"],
            renormalize=bool(hf.get("norm_topk_prob", False)),
        )
