"""Which data-parallel replica (engine) a request goes to.

Two strategies (``--data-parallel-routing``):

- ``affinity`` (the default): prefix affinity, then load. The prompt's first full blocks are hashed
  as the engine's prefix cache hashes them (shared/block_hash.py), chained to the request's LoRA
  adapter as the engine chains them (so a prompt under an adapter goes where that adapter's KV
  for it is, never to a replica holding only the base model's); the router remembers which
  replicas it recently sent each block hash to (a bounded LRU), so a request goes to the replica
  holding the longest run of its first blocks, and its KV is found in that engine's prefix cache.
  It goes elsewhere only when that replica is much more loaded than the least loaded one: more
  than ``max(LOAD_SLACK, least)`` requests ahead of it (twice its load, and at least a few). A
  prompt that matches nothing goes to the least loaded replica (then the emptier KV cache).
- ``round_robin``: each replica in turn, whatever the prompt.

Either way only replicas that are up take new requests; with none up, all are candidates (the
request then waits for its engine to come back, as with a single engine).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from shared.block_hash import extend_block_hashes
from shared.frontend_args import ROUTING_CHOICES

LOAD_SLACK = 4  # requests a replica may be ahead of the least loaded and still win on affinity
MAX_BLOCKS = 32  # prompt blocks hashed per request: enough to tell prefixes apart
CAPACITY = 1 << 16  # block hashes remembered (about 2.5 MB)


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one replica when it picks."""

    up: bool  # answering, with all its workers
    load: int  # requests it holds (running + waiting)
    kv_usage: float = 0.0  # fraction of its KV blocks in use


class RoundRobinRouter:
    """Each up replica in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, prompt: Sequence[int], block_size: int, replicas: list[ReplicaLoad],
             seed: bytes | None = None) -> tuple[int, str]:
        """(replica index, reason); seed: unused (see AffinityRouter.pick)."""
        n = len(replicas)
        order = [(self._next + k) % n for k in range(n)]
        chosen = next((i for i in order if replicas[i].up), order[0])
        self._next = (chosen + 1) % n
        return chosen, "round_robin"

    def forget(self, replica: int) -> None:
        """Nothing is remembered per replica."""


class AffinityRouter:
    """Prefix affinity under a load bound (see the module's docstring)."""

    name = "affinity"

    def __init__(self, capacity: int = CAPACITY, max_blocks: int = MAX_BLOCKS, load_slack: int = LOAD_SLACK):
        self.capacity, self.max_blocks, self.load_slack = capacity, max_blocks, load_slack
        self._seen: OrderedDict[bytes, set[int]] = OrderedDict()  # block hash -> replicas sent it, LRU
        self._turn = 0  # breaks ties between equally loaded replicas, so new prefixes spread

    def pick(self, prompt: Sequence[int], block_size: int, replicas: list[ReplicaLoad],
             seed: bytes | None = None) -> tuple[int, str]:
        """(replica index, "affinity" or "load"). seed: the request's LoRA adapter's hash seed
        (LoRARequest.hash_seed()), None for the base model."""
        n = len(replicas)
        candidates = [i for i in range(n) if replicas[i].up] or list(range(n))
        least = min(replicas[i].load for i in candidates)
        bound = least + max(self.load_slack, least)
        eligible = [i for i in candidates if replicas[i].load <= bound]
        num_blocks = min(len(prompt) // block_size, self.max_blocks)
        hashes = extend_block_hashes([], prompt, block_size, num_blocks, seed)
        depth = self._depths(hashes, eligible)

        def rank(i: int) -> tuple:
            return -depth[i], replicas[i].load, replicas[i].kv_usage, (i - self._turn) % n

        chosen = min(eligible, key=rank)
        self._turn = (self._turn + 1) % n
        self._remember(hashes, chosen)
        return chosen, "affinity" if depth[chosen] else "load"

    def forget(self, replica: int) -> None:
        """A replica's engine restarted with an empty cache: it holds none of its old prefixes."""
        for replicas in self._seen.values():
            replicas.discard(replica)

    def _depths(self, hashes: list[bytes], eligible: list[int]) -> dict[int, int]:
        """How many of the prompt's first blocks each replica was recently sent, in a row."""
        depth = dict.fromkeys(eligible, 0)
        alive = set(eligible)
        for block_hash in hashes:
            alive &= self._seen.get(block_hash, set())
            if not alive:
                break
            for i in alive:
                depth[i] += 1
        return depth

    def _remember(self, hashes: list[bytes], replica: int) -> None:
        for block_hash in hashes:
            replicas = self._seen.get(block_hash)
            if replicas is None:
                self._seen[block_hash] = {replica}
            else:
                replicas.add(replica)
                self._seen.move_to_end(block_hash)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


def make_router(name: str) -> AffinityRouter | RoundRobinRouter:
    """The strategy of ``--data-parallel-routing`` (ValueError for another name)."""
    if name == "affinity":
        return AffinityRouter()
    if name == "round_robin":
        return RoundRobinRouter()
    raise ValueError(f"--data-parallel-routing must be one of {', '.join(ROUTING_CHOICES)}, got {name!r}")
