"""Suffix decoding (SuffixDecoding; vLLM's "suffix" method): proposals from a suffix tree over the
request's own prompt and output, and from one over the outputs of recent requests.

Each decoding request keeps its own tree, extended by the tokens it gained since its last
proposal and dropped when it finishes; its output then joins the global tree, which keeps the
latest suffix_decoding_max_cached_requests outputs (the oldest evicted first). A proposal follows
a suffix of the request's tokens seen before, in either tree, taking the most frequent
continuation while its empirical probability stays at least suffix_decoding_min_token_prob, and
at most suffix_decoding_max_spec_factor tokens per matched token; of the matches (longest first)
and of the two trees, the proposal expected to have the most tokens accepted wins.
"""

from __future__ import annotations

from collections import deque

from shared.proposers.history import TokenHistory
from shared.proposers.suffix_tree import SuffixTree
from shared.speculative import SpeculativeConfig

# The global tree's node budget: past it the oldest outputs go even below max_cached_requests, so
# long outputs cannot grow the engine's (or worker's) memory without bound (~150 bytes a node).
MAX_GLOBAL_NODES = 1 << 20


class SuffixProposer:
    def __init__(self, config: SpeculativeConfig, max_global_nodes: int = MAX_GLOBAL_NODES):
        self.max_global_nodes = max_global_nodes
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.max_cached = config.suffix_decoding_max_cached_requests
        self.spec_factor = config.suffix_decoding_max_spec_factor
        self.min_prob = config.suffix_decoding_min_token_prob
        self.trees: dict[str, SuffixTree] = {}  # per running request: over its prompt and output
        self.global_tree = SuffixTree(self.max_depth)
        self.cached: deque[int] = deque()  # the global tree's sequences, oldest first
        self._next_seq = 0

    def propose_for(self, request: TokenHistory, k: int) -> list[int]:
        """Up to k tokens to follow the request's tokens."""
        if k <= 0:
            return []
        own, own_score = self._from_own(request, k)
        other, other_score = self._from_global(request.token_ids, k)
        return other if other_score > own_score else own

    def release(self, request: TokenHistory) -> None:
        """The request finished (or was aborted): drop its tree; its output joins the global one."""
        self.trees.pop(request.req_id, None)
        output = request.output_token_ids
        if self.max_cached == 0 or not output:
            return
        self.global_tree.extend(self._next_seq, output)
        self.global_tree.finish(self._next_seq)
        self.cached.append(self._next_seq)
        self._next_seq += 1
        while len(self.cached) > self.max_cached or (
            self.global_tree.num_nodes > self.max_global_nodes and len(self.cached) > 1
        ):
            self.global_tree.remove(self.cached.popleft())

    def _limit(self, k: int, match_len: int) -> int:
        return min(k, int(match_len * self.spec_factor))

    def _from_own(self, request: TokenHistory, k: int) -> tuple[list[int], float]:
        """From the longest suffix that occurred earlier in the request itself."""
        tree = self.trees.get(request.req_id)
        if tree is None or tree.seqs[0] is not request.token_ids:  # new, or resumed as a new request
            tree = self.trees[request.req_id] = SuffixTree(self.max_depth)
        tree.extend(0, request.token_ids)
        candidates = ((node, 0, request.num_tokens - start) for start, node in tree.active[0])  # seen twice
        return self._best(tree, candidates, k)

    def _from_global(self, token_ids: list[int], k: int) -> tuple[list[int], float]:
        """From the longest suffix of token_ids found in recent outputs."""
        tree = self.global_tree
        if not self.cached:
            return [], 0.0
        lo, hi = 0, min(self.max_depth - 1, len(token_ids))
        while lo < hi:  # every suffix of a string in the tree is in it: search the longest
            mid = (lo + hi + 1) // 2
            if tree.locate(token_ids[-mid:]) is not None:
                lo = mid
            else:
                hi = mid - 1
        candidates = ((*tree.locate(token_ids[-n:]), n) for n in range(lo, 0, -1))
        return self._best(tree, candidates, k)

    def _best(self, tree: SuffixTree, candidates, k: int) -> tuple[list[int], float]:
        """The proposal with the highest score among the matches (node, extra, length), longest
        first: a match near the tree's depth leaves little room to continue, so a shorter one
        may propose more. Stops at one that cannot be beaten (k tokens, each certain)."""
        best, best_score = [], 0.0
        for node, extra, match_len in candidates:
            tokens, score = tree.continuation(node, extra, self._limit(k, match_len), self.min_prob)
            if score > best_score:
                best, best_score = tokens, score
                if score >= k:
                    break
        return best, best_score
