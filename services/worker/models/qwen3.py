"""Qwen3 (dense): the Llama architecture plus an RMSNorm over each q and k head before rotary,
with an explicit head_dim that need not equal hidden_size / num_heads."""

from __future__ import annotations

import torch

from services.worker.layers.layernorm import RMSNorm
from services.worker.layers.rotary import RotaryEmbedding
from services.worker.models.llama import LlamaAttention, LlamaForCausalLM
from services.worker.models.qwen2 import Qwen2ForCausalLM
from shared.config import ModelConfig


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding):
        super().__init__(config, layer_idx, rotary_emb)
        eps = float(config.hf_config.get("rms_norm_eps", 1e-6))
        self.head_dim = config.head_dim
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (-1, self.head_dim)
        return self.q_norm(q.unflatten(-1, heads)).flatten(-2), self.k_norm(k.unflatten(-1, heads)).flatten(-2)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
    sliding_window = staticmethod(Qwen2ForCausalLM.sliding_window)
