"""Speculative decoding on the engine: proposals made where the token history lives.

The scheduler asks `SpecDecoder.propose` for a decoding request's proposed tokens; it schedules
them after the request's last token, the workers compute all of them in one forward and sample
every position, and the result holds the proposed tokens that matched what was sampled, then
one sampled token. Sampling each position from the target's own distribution and keeping a
proposal only where it equals the sample is rejection sampling for a point-mass proposal, so
every sampling parameter keeps its distribution. No torch here: the ngram proposer is numpy.
"""

from __future__ import annotations

import numpy as np

from services.engine.request import Request
from shared.speculative import SpeculativeConfig


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the history's last n tokens (n from
    max_n down to min_n) and propose the tokens that followed it. A match close to the end is a
    loop: its continuation runs into the proposals themselves, so it repeats with that period."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        if k <= 0 or len(token_ids) <= self.min_n:
            return []
        arr = np.asarray(token_ids)
        ends = np.flatnonzero(arr[:-1] == arr[-1])  # where an earlier n-gram could end
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            ok = ends[ends >= n - 1]
            for back in range(1, n):
                if not ok.size:
                    break
                ok = ok[arr[ok - back] == arr[-1 - back]]
            if ok.size:
                return _continue(arr, int(ok[-1]) + 1, k)
        return []


def _continue(arr: np.ndarray, start: int, k: int) -> list[int]:
    """k tokens from arr[start:], wrapping around with period len(arr) - start."""
    follow = arr[start:].tolist()
    return [follow[i % len(follow)] for i in range(k)]


class SpecDecoder:
    """Per-step proposals for the scheduler, and the counts behind the metrics (vLLM's drafts,
    draft tokens, accepted tokens and accepted tokens per position)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.proposer = NgramProposer(*config.lookup_range)
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens

    def propose(self, request: Request, room: int, num_running: int) -> list[int]:
        """Up to num_speculative_tokens tokens to verify after the request's last token: none
        while the batch is large enough (disable_by_batch_size), and never more than the
        request may still generate beyond the token this step samples anyway, or `room`
        (the step's token budget left after its last token)."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running >= limit:
            return []
        k = min(self.config.num_speculative_tokens, room, request.max_tokens - request.num_output_tokens - 1)
        return self.proposer.propose(request.token_ids, k)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """One verification: num_accepted of num_proposed tokens matched what was sampled."""
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1
