"""The prefix cache's identity of a block of tokens: a content hash chained over every token
before it, so two requests with the same prefix map to the same hashes. One definition, used by
the engine's prefix cache (services/engine/kv_cache_manager.py) and by the frontend's
data-parallel router (services/frontend/routing.py), which sends a prompt to the replica that
holds its first blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Content hash of a full block, chained to its parent's (collision-resistant, not Python's hash())."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, num_blocks: int,
                        seed: bytes | None = None) -> list[bytes]:
    """``hashes`` (the chain of the first blocks of ``token_ids``) extended in place to the first
    ``num_blocks`` full blocks; returns it. seed: what the first block chains to (a LoRA
    adapter's identity: the same tokens under another adapter have other KV); None for the base model."""
    for i in range(len(hashes), num_blocks):
        hashes.append(hash_block(hashes[-1] if hashes else seed, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
