"""BERT-family encoders: BertModel and XLMRobertaModel for embeddings, BertForSequenceClassification
for cross-encoder scores. Bidirectional attention (EncoderAttention), post-norm layers, learned
absolute positions and token types; nothing is kept in a KV cache.

Module names mirror Hugging Face (encoder.layer.N.attention.self.query, ...), with q/k/v fused
through packed_modules_mapping.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.forward_context import get_forward_context
from services.worker.layers.embedding import VocabParallelEmbedding
from services.worker.layers.encoder_attention import EncoderAttention
from services.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from shared.config import ModelConfig

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _eps(config: ModelConfig) -> float:
    return float(config.hf_config.get("layer_norm_eps", 1e-12))


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hf = config.hf_config
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(hf["max_position_embeddings"], config.hidden_size)
        self.token_type_embeddings = nn.Embedding(hf.get("type_vocab_size", 2), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=_eps(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        types = token_types.clamp(max=self.token_type_embeddings.num_embeddings - 1)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_heads,
                                          bias=True)
        self.attn = EncoderAttention(self.qkv_proj.num_heads, config.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(*self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1))


class BertOutput(nn.Module):
    """dense, then LayerNorm over the residual sum (HF's BertSelfOutput and BertOutput)."""

    def __init__(self, config: ModelConfig, input_size: int):
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=_eps(config))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config, config.num_heads * config.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        act = config.hf_config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.dense = ColumnParallelLinear(config.hidden_size, config.hf_config["intermediate_size"], bias=True)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.hf_config["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertPooler(nn.Module):
    """tanh(dense(CLS)): the classifier's input."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class BertModel(nn.Module):
    """input ids, positions [T] (each request from 0) -> hidden states [T, hidden_size]. The
    step's EncoderMetadata (forward context) says where each request starts and its token types."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = {
        "query": ("qkv_proj", "q"),
        "key": ("qkv_proj", "k"),
        "value": ("qkv_proj", "v"),
    }
    is_encoder: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def position_offset(self) -> int:
        return 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        token_types = get_forward_context().attn_metadata.token_type_ids
        x = self.embeddings(input_ids, positions + self.position_offset(), token_types)
        for layer in self.encoder.layer:
            x = layer(x)
        return x


class XLMRobertaModel(BertModel):
    """BERT with positions counted from padding_idx + 1 and a single token type."""

    def position_offset(self) -> int:
        return int(self.config.hf_config.get("pad_token_id", 1)) + 1


class BertForSequenceClassification(nn.Module):
    """A cross-encoder: classifier(pooler(CLS)) scores a (query, document) pair."""

    packed_modules_mapping = BertModel.packed_modules_mapping
    is_encoder: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bert = BertModel(config)
        self.num_labels = len(config.class_labels)
        self.classifier = ReplicatedLinear(config.hidden_size, self.num_labels, bias=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids, positions)

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """CLS hidden states [N, hidden] -> float32 logits [N, num_labels]."""
        return self.classifier(self.bert.pooler(cls_hidden)).float()
