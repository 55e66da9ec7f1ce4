"""Rejection sampling of a draft model's proposals against the target (speculative decoding).

A draft token d was drawn from the draft's distribution q (its logits processed with the request's
own sampling parameters). The target accepts it with probability min(1, p(d) / q(d)), p being the
target's processed distribution at that position; on rejection it samples from
normalize(max(0, p - q)). Either way the token is distributed as p (Leviathan et al. 2023), and
more drafts are kept than by the exact match of a point-mass proposal.

This applies to unseeded random rows. Greedy rows keep the exact match (p is a point mass at the
argmax). Seeded rows keep it too: their target token at each position comes from the position's
seeded noise whatever was proposed, so a seed gives the same output with or without speculation
and at any load; the draft drew its token with the same noise, which makes a match likely.
"""

from __future__ import annotations

import torch

from services.worker.layers.sampler import SamplingMetadata, process_logits, random_probs, random_sample
from services.worker.request_table import RequestState


def rejection_sampled(params) -> bool:
    """Whether a request's drafts are verified by rejection sampling against q (see the module)."""
    return not params.greedy and params.seed is None


class DraftDistributions:
    """The draft's distributions q of the drafts made by the latest step, per rejection-sampled
    request, for the next step to verify them with. Only the latest step's are kept: a request
    that was not scheduled in between, or was resent, has its drafts checked by exact match."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[list[int], torch.Tensor]] = {}  # req_id -> (drafts, q [len(drafts), V])

    def choose(
        self, logits: torch.Tensor, meta: SamplingMetadata, states: list[RequestState], j: int
    ) -> torch.Tensor | None:
        """Row by row, the token rejection sampling gives at verification position j (rows whose
        proposal j came from the draft with a known q), -1 elsewhere; None when no row has one.
        logits: the rows' logits, grammar-masked; meta: built for these rows."""
        rows, drafts, qs = [], [], []
        for i, state in enumerate(states):
            entry = self.latest.get(state.req_id)
            proposed = state.spec_token_ids
            if entry is None or j >= len(proposed) or entry[0][: len(proposed)] != proposed \
                    or not rejection_sampled(state.sampling.params):
                continue  # no proposal here, or not from the latest drafts: exact match
            rows.append(i)
            drafts.append(proposed[j])
            qs.append(entry[1][j])
        if not rows:
            return None
        device = logits.device
        index, d = torch.tensor(rows, device=device), torch.tensor(drafts, device=device)
        p = random_probs(process_logits(logits.float(), meta), meta)[index]
        q = torch.stack(qs)
        at = torch.arange(len(rows), device=device)
        accept = torch.rand(len(rows), device=device) * q[at, d] <= p[at, d]
        residual = random_sample((p - q).clamp_(min=0), {})
        chosen = torch.full((len(states),), -1, dtype=torch.long, device=device)
        chosen[index] = torch.where(accept, d, residual)
        return chosen
