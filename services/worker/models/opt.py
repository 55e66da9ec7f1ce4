"""OPT: learned positional embeddings (offset 2), LayerNorm before (or, opt-350m, after) each
block, ReLU feed-forward, biases everywhere, and project_in/project_out when the embedding width
(word_embed_proj_dim) differs from hidden_size. Module names mirror HF (model.decoder.layers.N...).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from services.worker.distributed import pp_size
from services.worker.layers.activation import get_act_fn
from services.worker.layers.attention import Attention
from services.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from services.worker.layers.layernorm import LayerNorm
from services.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from shared.config import ModelConfig


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """OPT reserves the first two rows: position p reads row p + 2."""

    offset = 2

    def __init__(self, max_positions: int, embedding_dim: int):
        super().__init__(max_positions + self.offset, embedding_dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.offset)


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        bias = bool(config.hf_config.get("enable_bias", True))
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, heads, bias=bias)
        self.out_proj = RowParallelLinear(heads * head_dim, hidden, bias=bias)
        local = self.qkv_proj.num_heads
        self.attn = Attention(local, head_dim, head_dim**-0.5, local, layer_idx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    """Attention and ReLU feed-forward blocks, each with LayerNorm before it or after the residual add."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hf, hidden = config.hf_config, config.hidden_size
        bias, affine = bool(hf.get("enable_bias", True)), bool(hf.get("layer_norm_elementwise_affine", True))
        self.norm_before = bool(hf.get("do_layer_norm_before", True))
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, hf["ffn_dim"], bias=bias)
        self.activation_fn = get_act_fn(hf.get("activation_function", "relu"))
        self.fc2 = RowParallelLinear(hf["ffn_dim"], hidden, bias=bias)
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm_before:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden))
            return hidden + self._ffn(self.final_layer_norm(hidden))
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden))
        return self.final_layer_norm(hidden + self._ffn(hidden))

    def _ffn(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden)))


class OPTDecoder(nn.Module):
    """Token and position embeddings, decoder layers: input ids [T] -> hidden states [T, embed dim]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hf, hidden = config.hf_config, config.hidden_size
        embed_dim = hf.get("word_embed_proj_dim") or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim)
        self.embed_positions = OPTLearnedPositionalEmbedding(hf.get("max_position_embeddings", 2048), hidden)
        projected = embed_dim != hidden
        self.project_in = ReplicatedLinear(embed_dim, hidden, bias=False) if projected else None
        self.project_out = ReplicatedLinear(hidden, embed_dim, bias=False) if projected else None
        # Only pre-norm models end with a LayerNorm (post-norm layers already end with one).
        final_norm = hf.get("do_layer_norm_before", True) and not hf.get("_remove_final_layer_norm", False)
        affine = bool(hf.get("layer_norm_elementwise_affine", True))
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine) if final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, positions)


class OPTForCausalLM(nn.Module):
    """Causal LM over flattened tokens of many requests (no batch dimension, no padding)."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        if pp_size() > 1:
            raise ValueError("OPT models do not support pipeline parallelism yet (use tensor parallelism)")
        self.config = config
        self.tie_word_embeddings = bool(config.hf_config.get("tie_word_embeddings", True))  # OPT ties by default
        self.model = OPTModel(config)
        embed = self.model.decoder.embed_tokens
        self.lm_head = ParallelLMHead(config.vocab_size, embed.embedding_dim)
        if self.tie_word_embeddings:
            self.lm_head.tie(embed)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, word_embed_proj_dim]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, word_embed_proj_dim] -> float32 logits [N, vocab_size]."""
        return self.lm_head(hidden)
