"""EAGLE draft heads over a Llama-family target (speculative_config method "eagle" or "eagle3";
the checkpoint formats are in shared/eagle.py).

A head drafts from the target's hidden states: `combine` turns the target's per-token hidden
state(s) into the head's input width, `forward(ids, positions, hidden)` returns (the state its
logits come from, the state fed to its next position), and `compute_logits` gives logits over the
target's vocabulary. At a position p the head reads token p + 1 with the hidden state of p.
Module names mirror the checkpoints' (`fc`, `layers.N` / `midlayer`, `norm`, `lm_head`, `d2t`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from services.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from services.worker.layers.layernorm import RMSNorm
from services.worker.layers.linear import QKVParallelLinear, ReplicatedLinear
from services.worker.layers.rotary import RotaryEmbedding, rope_parameters
from services.worker.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from shared.config import ModelConfig


class _Head(nn.Module):
    """What both heads share: the target's modules they borrow, the packed projections, and the
    token embedding (the checkpoint's own when it has one, else the target's)."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: ModelConfig, target: LlamaForCausalLM, own_embedding: bool):
        super().__init__()
        self.__dict__["target"] = target  # borrowed, not a submodule: its weights are not the head's
        if own_embedding:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_model_len, rope_parameters(config.hf_config))

    def borrows_embedding(self) -> bool:
        """Whether the head embeds with the target's embedding (its checkpoint has none)."""
        return "embed_tokens" not in self._modules

    def embed_with(self, embedding: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Embed with `embedding` instead of the target's: on a last pipeline stage, which does
        not hold the target's, a copy of it (eagle_runner.stage_embedding)."""
        self.__dict__["stage_embedding"] = embedding  # borrowed like the target: not the head's weights

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.borrows_embedding():
            return self.embed_tokens(input_ids)
        return self.__dict__.get("stage_embedding", self.target.model.embed_tokens)(input_ids)


class EagleHead(_Head):
    """EAGLE-1/2: fc over concat(token embedding, the target's last hidden state after its final
    norm), Llama decoder layers (the first without its input norm unless the checkpoint has one),
    no final norm, and the target's LM head; its own output (hidden + residual) feeds its next
    position."""

    def __init__(self, config: ModelConfig, target: LlamaForCausalLM, own_embedding: bool, fc_bias: bool,
                 first_norm: bool):
        super().__init__(config, target, own_embedding)
        h = config.hidden_size
        self.fc = ReplicatedLinear(2 * h, h, bias=fc_bias)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary_emb, LlamaForCausalLM) for i in range(config.num_layers)
        )
        if not first_norm:
            self.layers[0].input_layernorm = nn.Identity()

    def combine(self, target_hidden: torch.Tensor) -> torch.Tensor:
        return target_hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.fc(torch.cat([self.embed(input_ids), hidden], dim=-1)), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x = x + residual
        return x, x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over concat(normed embedding, normed hidden state), so
    its q/k/v projections take twice the hidden width; the hidden state is the residual."""

    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        h, eps = config.hidden_size, float(config.hf_config.get("rms_norm_eps", 1e-6))
        self.self_attn = LlamaAttention(config, 0, rotary_emb)
        qkv_bias, _ = LlamaAttention.biases(config.hf_config)
        self.self_attn.qkv_proj = QKVParallelLinear(2 * h, config.head_dim, config.num_heads, config.num_kv_heads,
                                                    bias=qkv_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm, self.hidden_norm, self.post_attention_layernorm = (RMSNorm(h, eps) for _ in range(3))
        # some checkpoints take the residual after hidden_norm (config "norm_before_residual")
        self.norm_before_residual = bool(config.hf_config.get("norm_before_residual", False))

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = self.self_attn(positions, torch.cat([self.input_layernorm(embeds), normed], dim=-1))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3Head(_Head):
    """EAGLE-3: fc over the concat of three target layers' hidden states (shared/eagle.py
    aux_layer_ids), one Eagle3Layer (`midlayer`), a final norm, and its own LM head over a draft
    vocabulary whose entry i is target token i + d2t[i]; its pre-norm output feeds its next
    position (already the head's width, so fc is skipped there)."""

    def __init__(self, config: ModelConfig, target: LlamaForCausalLM, own_embedding: bool, target_hidden: int):
        super().__init__(config, target, own_embedding)
        h, hf = config.hidden_size, config.hf_config
        self.vocab_size = config.vocab_size
        draft_vocab = int(hf.get("draft_vocab_size") or config.vocab_size)
        self.fc = ReplicatedLinear(3 * target_hidden, h, bias=False)
        self.midlayer = Eagle3Layer(config, self.rotary_emb)
        self.norm = RMSNorm(h, float(hf.get("rms_norm_eps", 1e-6)))
        self.lm_head = ParallelLMHead(draft_vocab, h)
        self.d2t = nn.Parameter(torch.zeros(draft_vocab, dtype=torch.long), requires_grad=False)

    @staticmethod
    def skip_checkpoint_tensor(name: str) -> bool:
        """t2d (target-to-draft membership) is implied by d2t."""
        return name == "t2d"

    def combine(self, target_hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(target_hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.midlayer(positions, self.embed(input_ids), hidden)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the target's vocabulary: -inf outside the draft vocabulary."""
        logits = self.lm_head(hidden)
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, torch.arange(logits.shape[1], device=logits.device) + self.d2t] = logits
        return full
