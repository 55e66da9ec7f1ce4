"""Llama-family decoder: Llama 2/3, Mistral and Gemma. Qwen2 and Qwen3 reuse every piece here and
only swap the attention class (qkv bias, per-head q/k norms).

Module names mirror Hugging Face (model.layers.N.self_attn.qkv_proj, ...) so checkpoint names map
directly, through packed_modules_mapping for the fused q/k/v and gate/up projections.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from services.worker.distributed import pp_rank, pp_size
from services.worker.layers.activation import get_gated_act_fn
from services.worker.layers.attention import Attention
from services.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from services.worker.layers.layernorm import GemmaRMSNorm, RMSNorm
from services.worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from services.worker.layers.rotary import RotaryEmbedding, rope_parameters
from services.worker.models import llama_decode_cpu
from services.worker.pipeline import Intermediate, MissingLayer, stage_layers
from shared.config import ModelConfig


def _rms_eps(config: ModelConfig) -> float:
    return float(config.hf_config.get("rms_norm_eps", 1e-6))


class LlamaAttention(nn.Module):
    """Fused QKV projection, rotary embedding, paged attention, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        qkv_bias, o_bias = self.biases(config.hf_config)
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_heads, config.num_kv_heads, bias=qkv_bias
        )
        self.o_proj = RowParallelLinear(config.num_heads * head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = rotary_emb
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.attn = Attention(heads, head_dim, head_dim**-0.5, kv_heads, layer_idx)

    @staticmethod
    def biases(hf_config: dict[str, Any]) -> tuple[bool, bool]:
        """Whether the qkv and output projections have a bias."""
        bias = bool(hf_config.get("attention_bias", False))
        return bias, bias

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook applied to q/k before rotary (Qwen3 normalizes each head); identity here."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q, k = self.rotary_emb(positions, *self.norm_qk(q, k))
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with gate and up fused (SiLU for Llama, GELU
    for Gemma)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hf = config.hf_config
        inter, bias = hf["intermediate_size"], bool(hf.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act_fn = get_gated_act_fn(hf.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual stream rides along through the norms."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, arch: type[LlamaForCausalLM]
    ):
        super().__init__()
        self.self_attn = arch.attention_cls(config, layer_idx, rotary_emb)
        self.mlp = arch.make_mlp(config, layer_idx)
        self.input_layernorm = arch.norm_cls(config.hidden_size, _rms_eps(config))
        self.post_attention_layernorm = arch.norm_cls(config.hidden_size, _rms_eps(config))

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embedding is the residual
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm: input ids [T] -> hidden states [T, hidden_size].
    A pipeline stage holds only its share of the layers (pipeline.py): an earlier stage returns an
    Intermediate for the next (hidden, residual, and the states entering the aux layers so far), a
    later one starts from it; the last stage's aux_hidden then holds every aux layer's."""

    def __init__(self, config: ModelConfig, arch: type[LlamaForCausalLM]):
        super().__init__()
        stages = pp_size()
        self.stage_layers = stage_layers(config.num_layers, pp_rank(), stages)
        self.first, self.last = self.stage_layers.start == 0, pp_rank() == stages - 1
        hidden_size = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden_size) if self.first else MissingLayer()
        self.embed_scale = arch.embed_scale(config)  # Gemma scales the embeddings by sqrt(hidden_size)
        # One cos/sin table shared by every layer.
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_model_len, rope_parameters(config.hf_config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary_emb, arch) if i in self.stage_layers else MissingLayer()
            for i in range(config.num_layers)
        )
        self.norm = arch.norm_cls(hidden_size, _rms_eps(config)) if self.last else MissingLayer()
        self.aux_layers: tuple[int, ...] = ()  # layers whose input hidden states an EAGLE-3 head reads
        self.aux_hidden: list[torch.Tensor] = []  # theirs in the latest forward, in aux_layers' order

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        if self.first:
            hidden, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        else:
            hidden, residual = intermediate.hidden, intermediate.residual
        fused = llama_decode_cpu.run(self, positions, hidden) if residual is None else None
        if fused is not None:  # a float32 CPU decode step, one stage: every layer in one C call (aux_hidden too)
            hidden, residual = fused
        else:
            aux = {} if intermediate is None else dict(intermediate.aux)  # those of earlier stages' layers
            for i in self.stage_layers:
                if i in self.aux_layers:  # the residual stream entering layer i
                    aux[i] = hidden if residual is None else hidden + residual
                hidden, residual = self.layers[i](positions, hidden, residual)
            if not self.last:
                return Intermediate(hidden, residual, aux)
            self.aux_hidden = [aux[i] for i in self.aux_layers]
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Causal LM over flattened tokens of many requests (no batch dimension, no padding)."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm
    tied_by_default: ClassVar[bool] = False  # when config.json does not say
    renamed_modules: ClassVar[dict[str, str]] = {}  # checkpoint module name -> ours
    expert_mapping: ClassVar[dict[str, tuple[str, object]]] = {}  # MoE: expert projection -> stacked parameter
    stage_aliases: ClassVar[dict[str, str]] = {}  # a weight of another pipeline stage that this one loads too

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        window = self.sliding_window(config.hf_config)
        if window is not None and window < config.max_model_len:
            raise ValueError(
                f"sliding-window attention (window {window}) is not supported; "
                f"use max_model_len <= {window}"
            )
        self.tie_word_embeddings = bool(config.hf_config.get("tie_word_embeddings", self.tied_by_default))
        self.model = LlamaModel(config, type(self))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if self.model.last else MissingLayer()
        if self.tie_word_embeddings and self.model.last:
            if self.model.first:
                self.lm_head.tie(self.model.embed_tokens)
            else:  # the embedding lives on the first stage: this stage loads its own copy
                self.stage_aliases = {"model.embed_tokens.weight": "lm_head.weight"}

    @staticmethod
    def sliding_window(hf_config: dict[str, Any]) -> int | None:
        """The attention window the checkpoint was trained with, if any."""
        return None

    @staticmethod
    def embed_scale(config: ModelConfig) -> float | None:
        """A factor on the input embeddings, if the architecture has one."""
        return None

    @staticmethod
    def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of one decoder layer (MoE models route some or all of them)."""
        return LlamaMLP(config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        """input_ids, positions [T] -> hidden states [T, hidden_size]; with pipeline stages, an
        earlier stage's Intermediate -> this stage's (the last stage's: hidden states)."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size]."""
        return self.lm_head(hidden)

    def set_aux_hidden_layers(self, layers: tuple[int, ...]) -> None:
        """Keep, after each forward, the hidden states entering these layers (model.aux_hidden,
        for an EAGLE-3 head)."""
        self.model.aux_layers = tuple(layers)

    def aux_layers_received(self) -> list[int]:
        """The aux layers of earlier pipeline stages, ascending and each once: the states entering
        them come with the previous stage's activations (pipeline.py)."""
        return sorted({i for i in self.model.aux_layers if i < self.model.stage_layers.start})


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's architecture; older Mistral checkpoints add a sliding attention window."""

    @staticmethod
    def sliding_window(hf_config: dict[str, Any]) -> int | None:
        return hf_config.get("sliding_window")


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma: Llama's layout with (1 + weight) RMSNorms, a GELU-gated MLP, embeddings scaled by
    sqrt(hidden_size) and the LM head tied to them."""

    norm_cls = GemmaRMSNorm
    tied_by_default = True

    @staticmethod
    def embed_scale(config: ModelConfig) -> float | None:
        return config.hidden_size**0.5
