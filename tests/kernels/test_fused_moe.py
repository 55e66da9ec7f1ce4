"""fused_moe (sorted pairs + two grouped GEMMs) against its reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES, skip_unsupported

pytest.importorskip("triton")

from kernels.fused_moe import align_pairs, fused_moe, fused_moe_ref


def _routing(num_tokens: int, num_experts: int, top_k: int, skip_expert: int | None = None):
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9  # an expert no token picks
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return weights, ids


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_pairs_sorts_by_expert_into_whole_blocks(block_m):
    _, ids = _routing(37, 6, 2, skip_expert=3)
    pair_ids, block_expert = align_pairs(ids, 6, block_m)
    assert pair_ids.numel() == block_expert.numel() * block_m
    real = pair_ids[pair_ids >= 0]
    assert sorted(real.tolist()) == list(range(37 * 2))  # every pair exactly once
    flat = ids.flatten()
    for b, expert in enumerate(block_expert.tolist()):
        rows = pair_ids[b * block_m : (b + 1) * block_m]
        if expert < 0:
            assert (rows == -1).all()  # past the end
        else:
            assert (flat[rows[rows >= 0].long()] == expert).all()
    assert 3 not in block_expert.tolist()
    assert block_expert.tolist() == sorted(block_expert.tolist(), key=lambda e: (e < 0, e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(5, 4, 2), (70, 8, 2), (3, 3, 1)])
def test_matches_reference(dtype, num_tokens, num_experts, top_k):
    skip_unsupported(dtype, uses_dot=True)
    hidden, inter = 48, 40  # neither a multiple of the tiles
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE) / inter**0.5).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, skip_expert=num_experts - 1 if num_experts > 3 else None)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    tol = {k: 4 * v for k, v in TOLERANCES[dtype].items()}  # two GEMMs and a sum
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **tol)


def test_checks_shapes_and_handles_no_tokens():
    x, w13, w2 = torch.randn(2, 16, device=DEVICE), torch.randn(4, 32, 16, device=DEVICE), torch.randn(4, 16, 16, device=DEVICE)
    weights, ids = _routing(2, 4, 2)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, torch.randn(4, 16, 8, device=DEVICE), weights, ids)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        fused_moe(x, w13, w2, weights[:1], ids[:1])
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)
