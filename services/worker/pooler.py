"""Pooling: each pooling request's hidden states -> one vector (an embedding, or a cross-encoder's
scores), as the checkpoint's sentence-transformers files say (shared.pooling.PoolerConfig).

Embeddings are pooled (mean, CLS or last token), cut to the request's `dimensions` (matryoshka)
and L2-normalized when the model normalizes. A classifier's CLS state goes through its head; one
label gives a sigmoid score, several a softmax over the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.request_table import RequestState
from shared.pooling import PoolerConfig

PoolingRow = tuple[RequestState, int, int]  # (request, first row in the step, rows)


class Pooler:
    def __init__(self, config: PoolerConfig, model: nn.Module):
        if config.task == "classify" and not hasattr(model, "classify"):
            raise ValueError(f"{type(model).__name__} has no classification head")
        self.config = config
        self.model = model

    def pool(self, hidden: torch.Tensor, rows: list[PoolingRow]) -> dict[str, list[float]]:
        """The pooled vector of every request in rows, by request id."""
        pooled = torch.stack([self._pool_one(hidden[first : first + n]) for _, first, n in rows])
        if self.config.task == "classify":
            logits = self.model.classify(pooled)
            scores = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
            return {state.req_id: vec for (state, _, _), vec in zip(rows, scores.tolist())}
        out = {}
        pooled = pooled.float()
        for (state, _, _), vec in zip(rows, pooled):
            dims = state.pooling.dimensions
            vec = vec[:dims] if dims is not None else vec
            out[state.req_id] = (F.normalize(vec, dim=-1) if self.config.normalize else vec).tolist()
        return out

    def _pool_one(self, hidden: torch.Tensor) -> torch.Tensor:
        kind = self.config.pooling_type
        if kind == "MEAN":
            return hidden.float().mean(dim=0).to(hidden.dtype)
        return hidden[0] if kind == "CLS" else hidden[-1]
