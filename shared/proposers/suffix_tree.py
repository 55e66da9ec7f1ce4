"""A suffix trie bounded in depth, over one or more token sequences, for suffix decoding.

Every substring of up to max_depth tokens of the indexed sequences is a path from the root, and
each node counts the occurrences of its string. A node with a single occurrence does not hold
its descendants: it is a *frontier* node that points at that occurrence (sequence, start), whose
continuation is read from the sequence itself. So only strings that occur at least twice cost a
node of their own, plus one frontier node per occurrence that leaves them: a sequence of n tokens
with few repeats costs O(n) nodes, not O(n * max_depth).

Appending a token costs one step for each suffix of the sequence's last max_depth tokens that
still runs through shared (materialized) nodes: O(max_depth) at worst, nothing for a suffix that
is already alone on its own frontier.
"""

from __future__ import annotations

import bisect

ROOT = 0


class SuffixTree:
    """Nodes live in parallel lists indexed by node id (freed ids are reused)."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.count: list[int] = [0]
        self.kids: list[dict[int, int] | None] = [{}]  # None: a frontier node
        self.ref: list[tuple[int, int] | None] = [None]  # a frontier node's occurrence: (seq id, start)
        self.depth: list[int] = [0]
        self._free: list[int] = []
        self.seqs: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}  # tokens of each sequence indexed so far
        # per sequence: (start, node) of its suffixes (up to max_depth long) that end at its last
        # indexed token and still run through materialized nodes, longest first
        self.active: dict[int, list[tuple[int, int]]] = {}

    @property
    def num_nodes(self) -> int:
        return len(self.count) - len(self._free)

    # ----- building --------------------------------------------------------------------------

    def extend(self, seq_id: int, seq: list[int]) -> None:
        """Index the tokens of seq not indexed yet (seq only ever grows at its end)."""
        if seq_id not in self.seqs:
            self.seqs[seq_id], self.length[seq_id], self.active[seq_id] = seq, 0, []
        for n in range(self.length[seq_id], len(seq)):
            self.length[seq_id] = n + 1
            token, moved = seq[n], []
            for start, node in self.active[seq_id] + [(n, ROOT)]:
                if n + 1 - start > self.max_depth:
                    continue  # this suffix is max_depth long: it stops growing
                child = self._step(node, token, seq_id, start)
                if child is not None:
                    moved.append((start, child))
            self.active[seq_id] = moved

    def _step(self, node: int, token: int, seq_id: int, start: int) -> int | None:
        """Count one more occurrence of node's string + token; its node, or None where this
        occurrence is the string's only one (it continues on its own frontier)."""
        kids = self.kids[node]
        child = kids.get(token)
        if child is None:
            kids[token] = self._new(self.depth[node] + 1, 1, (seq_id, start))
            return None
        if self.kids[child] is None:
            self._materialize(child)
        self.count[child] += 1
        return child

    def _materialize(self, node: int) -> None:
        """A frontier node gains a second occurrence: its first one leaves it by a frontier child."""
        seq_id, start = self.ref[node]
        depth = self.depth[node]
        self.kids[node], self.ref[node] = {}, None
        pos = start + depth
        if depth >= self.max_depth:
            return
        if pos < self.length[seq_id]:
            self.kids[node][self.seqs[seq_id][pos]] = self._new(depth + 1, 1, (seq_id, start))
        elif seq_id in self.active:  # that occurrence ends its sequence, which still grows: it walks again
            bisect.insort(self.active[seq_id], (start, node))

    def _new(self, depth: int, count: int, ref: tuple[int, int]) -> int:
        if self._free:
            i = self._free.pop()
            self.count[i], self.kids[i], self.ref[i], self.depth[i] = count, None, ref, depth
            return i
        self.count.append(count)
        self.kids.append(None)
        self.ref.append(ref)
        self.depth.append(depth)
        return len(self.count) - 1

    def finish(self, seq_id: int) -> None:
        """No more tokens come for this sequence (it stays indexed)."""
        self.active.pop(seq_id, None)

    def remove(self, seq_id: int) -> None:
        """Take a whole sequence out: every node only it occurred in returns to the free list."""
        seq, length = self.seqs[seq_id], self.length[seq_id]
        for start in range(length):
            node = ROOT
            for pos in range(start, min(length, start + self.max_depth)):
                kids = self.kids[node]  # materialized: a frontier's count would have reached 0
                child = kids[seq[pos]]
                self.count[child] -= 1
                if self.count[child] == 0:
                    del kids[seq[pos]]
                    self._free_subtree(child)
                    break
                node = child
        del self.seqs[seq_id], self.length[seq_id]
        self.active.pop(seq_id, None)

    def _free_subtree(self, node: int) -> None:
        stack = [node]
        while stack:
            i = stack.pop()
            stack.extend((self.kids[i] or {}).values())
            self.kids[i], self.ref[i] = None, None
            self._free.append(i)

    # ----- querying --------------------------------------------------------------------------

    def locate(self, tokens: list[int]) -> tuple[int, int] | None:
        """Where the string `tokens` ends: (node, tokens past the node inside its frontier), or
        None if it never occurs."""
        node, extra = ROOT, 0
        for token in tokens:
            kids = self.kids[node]
            if kids is not None:
                node = kids.get(token, -1)
                if node < 0:
                    return None
                continue
            seq_id, start = self.ref[node]
            depth = self.depth[node] + extra
            pos = start + depth
            if depth >= self.max_depth or pos >= self.length[seq_id] or self.seqs[seq_id][pos] != token:
                return None
            extra += 1
        return node, extra

    def continuation(self, node: int, extra: int, limit: int, min_prob: float) -> tuple[list[int], float]:
        """Up to `limit` tokens following the string at (node, extra), each time the most frequent
        next token, stopping where the path's empirical probability (the product of each token's
        share among the continuations seen) falls below min_prob. Returns the tokens and their
        score: the sum of those probabilities (the expected number accepted)."""
        out, prob, score = [], 1.0, 0.0
        while len(out) < limit:
            kids = self.kids[node]
            if kids is None:  # one occurrence: it continues as its sequence does
                seq_id, start = self.ref[node]
                depth = self.depth[node] + extra
                if depth >= self.max_depth or start + depth >= self.length[seq_id]:
                    break
                out.append(self.seqs[seq_id][start + depth])
                extra += 1
            else:
                if not kids:
                    break
                token, child = max(kids.items(), key=lambda kv: self.count[kv[1]])
                prob *= self.count[child] / sum(self.count[c] for c in kids.values())
                if prob < min_prob:
                    break
                out.append(token)
                node, extra = child, 0
            score += prob
        return out, score
