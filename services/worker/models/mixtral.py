"""Mixtral: Llama's attention with every MLP replaced by top-2 routed SwiGLU experts
(`block_sparse_moe`, experts w1/w3/w2 = gate/up/down), routing weights renormalized."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from services.worker.layers.moe import SparseMoeBlock
from services.worker.models.llama import MistralForCausalLM
from shared.config import ModelConfig


class MixtralForCausalLM(MistralForCausalLM):
    renamed_modules: ClassVar[dict[str, str]] = {"block_sparse_moe": "mlp"}
    expert_mapping: ClassVar[dict[str, tuple[str, object]]] = {"w1": ("w13_weight", 0), "w3": ("w13_weight", 1), "w2": ("w2_weight", None)}

    @staticmethod
    def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
        hf = config.hf_config
        return SparseMoeBlock(
            hf["num_local_experts"], hf["num_experts_per_tok"], config.hidden_size, hf["intermediate_size"],
            renormalize=True,
        )
