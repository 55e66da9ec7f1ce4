"""Per-request block tables on top of the block pool, with prefix-cache lookups."""

from __future__ import annotations

from services.engine.block_pool import Block, BlockPool
from services.engine.request import Request
from shared.block_hash import extend_block_hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._blocks: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self._num_cached: dict[str, int] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(req_id, ())]

    def _block_hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the request's full blocks among its first num_tokens tokens, extended lazily."""
        hashes = self._hashes.setdefault(request.req_id, [])
        # an adapter's KV differs from the base model's for the same tokens: its chain starts apart
        seed = None if request.lora_request is None else request.lora_request.hash_seed()
        return extend_block_hashes(hashes, request.token_ids, self.block_size, num_tokens // self.block_size, seed)

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """Cached blocks holding a prefix of a request about to start. The last token is always
        left to compute, since the step needs its logits; a request that wants prompt logprobs
        computes its whole prompt until they are delivered."""
        if not self._caches(request) or request.prompt_logprobs is not None:
            return []
        hashes = self._block_hashes(request, request.num_tokens - 1)
        hits = []
        for block_hash in hashes:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queried_tokens += request.num_tokens
        self.prefix_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, computed: list[Block] | None = None) -> list[int] | None:
        """Reserve room for num_new_tokens more tokens (after any prefix-hit blocks). Returns the
        ids of the blocks added to the request's table, or None when the pool is short."""
        computed = computed or []
        blocks = self._blocks.get(request.req_id, [])
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(blocks) - len(computed))
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)  # hits sitting in the free queue
        if need + reclaimed > self.pool.num_free_blocks:
            return None
        self.pool.touch(computed)
        added = computed + self.pool.get_new_blocks(need)
        self._blocks.setdefault(request.req_id, []).extend(added)
        if self._caches(request):
            self._cache_full_blocks(request, total)
        return [b.block_id for b in added]

    def _caches(self, request: Request) -> bool:
        """Pooling requests neither hit nor fill the prefix cache: their pooling reads every
        token's hidden state, and an encoder keeps no KV."""
        return self.enable_caching and request.pooling is None

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        # Blocks are indexed as soon as their tokens are scheduled: within a step every layer
        # writes all new K/V before any attention reads, so a hit in the same step is safe.
        # Tokens still in flight (async scheduling) are not known yet: their blocks are indexed
        # by a later allocation, once they are.
        start = self._num_cached.get(request.req_id, 0)
        n_full = min(num_tokens, request.num_tokens) // self.block_size
        if n_full <= start:
            return
        hashes = self._block_hashes(request, num_tokens)
        blocks = self._blocks[request.req_id]
        for i in range(start, n_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached[request.req_id] = n_full

    def trim(self, request: Request, num_tokens: int) -> int | None:
        """Return the blocks past the first num_tokens tokens (speculative decoding's rejected
        tokens) to the pool. Returns how many blocks the request keeps, None when none went.
        Blocks past num_tokens were never indexed: they hold no full block of known tokens."""
        blocks = self._blocks.get(request.req_id, [])
        keep = -(-num_tokens // self.block_size)
        if len(blocks) <= keep:
            return None
        self.pool.free(blocks[keep:][::-1])
        del blocks[keep:]
        return keep

    def free(self, request: Request) -> None:
        """Return a request's blocks, tail first, so its prefix stays cached longest."""
        blocks = self._blocks.pop(request.req_id, [])
        self.pool.free(blocks[::-1])
        self._hashes.pop(request.req_id, None)
        self._num_cached.pop(request.req_id, None)

    @property
    def usage(self) -> float:
        return self.pool.usage
