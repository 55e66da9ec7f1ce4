"""Block pool and KV cache manager: prefix hits, eviction order, reference counts, no leaks."""

from __future__ import annotations

import pytest

from services.engine.block_pool import BlockPool
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.request import Request
from shared.block_hash import hash_block
from shared.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8), (0,), max_model_len=1024)


def test_hash_chain_depends_on_parent_and_tokens():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])


def test_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    assert pool.num_free_blocks == 2
    pool.free([b, a])  # b freed first: b is evicted before a
    assert pool.num_free_blocks == 4
    assert pool.lookup(b"ha") is a
    taken = pool.get_new_blocks(3)  # two never-used blocks, then b (oldest freed, cached)
    assert b in taken and a not in taken
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") is a
    assert pool.num_evictions == 1
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)


def test_touch_takes_cached_free_block_out_of_the_queue():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, b"h")
    pool.free([a])
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.touch([a])
    pool.free([a])
    assert pool.num_free_blocks == 1
    pool.free([a])
    assert pool.num_free_blocks == 2


def test_prefix_hits_are_counted_and_last_token_recomputed():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 13))  # 3 full blocks
    first = make_request("a", prompt)
    assert kv.get_computed_blocks(first) == []
    assert kv.allocate_slots(first, len(prompt)) is not None
    kv.free(first)
    assert kv.pool.num_free_blocks == 16

    again = make_request("b", prompt)
    hits = kv.get_computed_blocks(again)
    # 12 tokens = 3 full blocks, but the last token must be recomputed: only 2 blocks hit
    assert len(hits) == 2
    assert kv.prefix_hit_tokens == 8 and kv.prefix_queried_tokens == 24

    longer = make_request("c", prompt + [99, 98])
    assert len(kv.get_computed_blocks(longer)) == 3


def test_shared_prefix_blocks_are_shared_and_freed_once():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(1, 10))  # 9 tokens: 2 full blocks + 1 partial
    a, b = make_request("a", prompt), make_request("b", prompt)
    ids_a = kv.allocate_slots(a, 9)
    hits = kv.get_computed_blocks(b)
    ids_b = kv.allocate_slots(b, 1, hits)
    assert ids_b[:2] == ids_a[:2] and ids_b[2] != ids_a[2]
    assert kv.pool.num_free_blocks == 10 - 4
    kv.free(a)
    assert kv.pool.num_free_blocks == 10 - 3
    kv.free(b)
    assert kv.pool.num_free_blocks == 10


def test_allocation_fails_cleanly_when_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r = make_request("a", list(range(1, 20)))
    assert kv.allocate_slots(r, 19) is None
    assert kv.pool.num_free_blocks == 3 and kv.block_ids("a") == []


def test_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    r = make_request("a", list(range(1, 13)))
    kv.allocate_slots(r, 12)
    kv.free(r)
    assert kv.get_computed_blocks(make_request("b", list(range(1, 13)))) == []
