"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into equal contiguous ranges, one per rank (the last range padded with
zero rows when the vocabulary does not divide). The embedding looks up the ids in its range and
all-reduces; the LM head computes its range's logits and all-gathers them to the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import f32_linear_cpu
from services.worker.distributed import tp_all_gather, tp_all_reduce, tp_rank, tp_size
from services.worker.layers.linear import make_param


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (vocabulary entries) are split across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size = tp_size()
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = tp_rank() * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = make_param(self.rows_per_rank, embedding_dim, weight_loader=self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        expected = (self.num_embeddings, self.embedding_dim)
        if shard_id is not None or tuple(loaded_weight.shape) != expected:
            raise ValueError(f"embedding expects a {expected} tensor, got {tuple(loaded_weight.shape)}")
        rows = loaded_weight[self.vocab_start : self.vocab_end]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()  # padding rows of the last rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))  # other ranks contribute those rows
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to the vocabulary; may share its weight with the input embedding."""

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Use the embedding's weight (tie_word_embeddings); the checkpoint then has no lm_head."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> float32 logits [N, vocab_size] over the full vocabulary."""
        logits = f32_linear_cpu.linear(hidden, self.weight)
        if self.tp_size > 1:  # a model built whole on one rank of several gathers nothing
            logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings].float()
