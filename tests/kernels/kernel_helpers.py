"""Shared helpers for the kernel tests: the device, per-dtype tolerances, random paged caches."""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type != "cuda"

# Loosest tolerances per dtype, for outputs of O(1) magnitude computed with float32 accumulation.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def skip_unsupported(dtype: torch.dtype, *, uses_dot: bool = False) -> None:
    """The interpreter runs tl.dot as a numpy matmul, which has no bfloat16 (it sees raw bits)."""
    if INTERPRETED and uses_dot and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot run tl.dot on bfloat16; covered natively on CUDA")


def random_paged_cache(
    seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, spare_blocks: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random KV cache and int32 block tables giving each request shuffled, disjoint blocks.

    Table entries past a request's last block are -1, so a kernel that reads them would fail.
    """
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(device=DEVICE, dtype=dtype)
    perm = torch.randperm(num_blocks).tolist()
    width = max(needed) + 1
    table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor(perm[start : start + n], dtype=torch.int32)
        start += n
    return cache, table.to(DEVICE)
