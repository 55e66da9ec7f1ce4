"""Prompt lookup (vLLM's "ngram" method): propose the tokens that followed the latest earlier
occurrence of the request's last n tokens."""

from __future__ import annotations

import numpy as np

from shared.proposers.history import TokenHistory


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

    def propose_for(self, request: TokenHistory, k: int) -> list[int]:
        return self.propose(request.token_ids, k)

    def release(self, request: TokenHistory) -> None:
        """Nothing is kept per request."""


def _continue(arr: np.ndarray, start: int, k: int) -> list[int]:
    """k tokens from arr[start:], wrapping around with period len(arr) - start."""
    follow = arr[start:].tolist()
    return [follow[i % len(follow)] for i in range(k)]
