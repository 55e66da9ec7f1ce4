"""An EAGLE-1 head for training (benchmarks/train_eagle.py), in torch with transformers' Llama
decoder layer: the module structure and parameter names pagedserve loads for speculative_config
method "eagle" (shared/eagle.py, services/worker/models/eagle.py), with autograd.

Over one sequence, position p reads token p + 1 and the target's last hidden state of position p
(after its final norm), at rotary position p, and attends causally to positions <= p:
fc(concat(embedding, feature)), then one Llama decoder layer without its input norm, no final
norm. Its output is the predicted feature of position p + 1, whose logits through the target's LM
head predict token p + 2. The target's embedding and LM head are borrowed, frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.layers.rotary import inverse_frequencies, rope_parameters


class Frozen:
    """The target's token embedding and LM head (the same tensor when tied), never trained."""

    def __init__(self, embedding: torch.Tensor, lm_head: torch.Tensor):
        self.embedding, self.lm_head = embedding.float(), lm_head.float()

    @classmethod
    def load(cls, target_dir: str | Path) -> Frozen:
        from services.worker.loader import checkpoint_tensor, checkpoint_tensor_names

        config = json.loads((Path(target_dir) / "config.json").read_text())
        embedding = checkpoint_tensor(target_dir, "model.embed_tokens.weight")
        tied = config.get("tie_word_embeddings", False)
        if tied or "lm_head.weight" not in checkpoint_tensor_names(target_dir):
            return cls(embedding, embedding)
        return cls(embedding, checkpoint_tensor(target_dir, "lm_head.weight"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)


def decoder_layer(config: dict) -> nn.Module:
    """transformers' Llama decoder layer without its input norm (as published EAGLE-1 heads), its
    attention causal through SDPA."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    llama = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    llama._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(llama, layer_idx=0)
    layer.input_layernorm = nn.Identity()
    return layer


class TorchEagleHead(nn.Module):
    """forward(tokens [B, S], features [B, S, h]) -> predicted next features [B, S, h]; tokens[:, p]
    is token p + 1 of the sequence, features[:, p] the target's state at position p."""

    def __init__(self, config: dict, frozen: Frozen):
        super().__init__()
        h = config["hidden_size"]
        self.config, self.frozen = config, frozen
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([decoder_layer(config)])
        head_dim = config.get("head_dim") or h // config["num_attention_heads"]
        inv_freq = inverse_frequencies(head_dim, rope_parameters(config))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        freqs = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float32), self.inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)[None]  # both halves of each head rotate alike
        x = self.fc(torch.cat([F.embedding(tokens, self.frozen.embedding), features], dim=-1))
        for layer in self.layers:
            x = layer(x, position_embeddings=(angles.cos(), angles.sin()))
        return x

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return self.frozen.logits(predicted)

    @torch.no_grad()
    def start_as_identity(self, embedding_scale: float = 0.1) -> None:
        """Make the untrained head pass its input feature through: fc selects the feature (its
        embedding half small), the layer's output projections are zero. It then drafts what the
        target's state one position back predicts (pagedserve/test_eagle.py's probe head), which
        is right wherever the target repeats itself, and training starts from there."""
        h = self.config["hidden_size"]
        self.fc.weight[:, :h] *= embedding_scale
        self.fc.weight[:, h:] = torch.eye(h)
        for layer in self.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (shared/eagle.py "eagle"): fc.weight, layers.0.*."""
        return {name: p.detach().float().contiguous() for name, p in self.state_dict().items()}

    @classmethod
    def from_checkpoint(cls, head_dir: str | Path, frozen: Frozen) -> TorchEagleHead:
        from safetensors.torch import load_file

        head = cls(json.loads((Path(head_dir) / "config.json").read_text()), frozen)
        head.load_state_dict(load_file(str(Path(head_dir) / "model.safetensors")))
        return head
