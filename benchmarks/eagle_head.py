"""An EAGLE-1 head in plain torch, for training (benchmarks/train_eagle.py): the module structure
and parameter names pagedserve loads for speculative_config method "eagle" (shared/eagle.py,
services/worker/models/eagle.py), with autograd.

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


class Attention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h, self.heads = config["hidden_size"], config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or h // self.heads
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def split(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(b, s, n, self.head_dim).transpose(1, 2)  # [B, heads, S, D]

        q = _rotate(split(self.q_proj(x), self.heads), cos, sin)
        k = _rotate(split(self.k_proj(x), self.kv_heads), cos, sin)
        v = split(self.v_proj(x), self.kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h, inter = config["hidden_size"], config["intermediate_size"]
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden_size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class DecoderLayer(nn.Module):
    """A Llama decoder layer without its input norm (as published EAGLE-1 heads)."""

    def __init__(self, config: dict):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], float(config.get("rms_norm_eps", 1e-6)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TorchEagleHead(nn.Module):
    """forward(tokens [B, S], features [B, S, h]) -> predicted next features [B, S, h]; tokens[:, p]
    is token p + 1 of the sequence, features[:, p] the target's state at position p."""

    def __init__(self, config: dict, frozen: Frozen):
        super().__init__()
        h = config["hidden_size"]
        self.config, self.frozen = config, frozen
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(config)])
        head_dim = config.get("head_dim") or h // config["num_attention_heads"]
        inv_freq = inverse_frequencies(head_dim, rope_parameters(config))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        freqs = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        x = self.fc(torch.cat([F.embedding(tokens, self.frozen.embedding), features], dim=-1))
        for layer in self.layers:
            x = layer(x, cos, sin)
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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary (the two halves of each head rotate together), as pagedserve and HF Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
