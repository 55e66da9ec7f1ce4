"""The segmented LoRA kernels (shrink then expand, each token reading its own adapter slot)
against their torch reference, and against the worker's torch path (one matmul pair per slot)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES

pytest.importorskip("triton")

from kernels.lora import lora_delta, lora_delta_ref
from services.worker.lora.layer import LoRAMapping, lora_delta_torch


def _inputs(dtype, tokens=7, k=40, n=72, rank=24, slots=3):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device=DEVICE).to(dtype)
    y = torch.randn(tokens, n, device=DEVICE).to(dtype)
    a = (torch.randn(slots, rank, k, device=DEVICE) / k**0.5).to(dtype)
    b = (torch.randn(slots, n, rank, device=DEVICE) * 0.1).to(dtype)
    token_slots = torch.tensor([2, -1, 0, 0, 2, -1, 1][:tokens], device=DEVICE, dtype=torch.int32)
    return x, y, a, b, token_slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 24, 96])  # one block of ranks; padded; the wide tiles (BLOCK_R 128)
def test_matches_reference(dtype, rank):
    x, y, a, b, slots = _inputs(dtype, rank=rank)
    expected = lora_delta_ref(x, y, a, b, slots)
    base_rows = y[slots < 0].clone()
    assert lora_delta(x, y, a, b, slots) is y
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])
    assert torch.equal(y[slots < 0], base_rows)  # rows of the base model are untouched


def test_matches_the_torch_path():
    x, y, a, b, slots = _inputs(torch.float32)
    expected = lora_delta_torch(x, y.clone(), a, b, LoRAMapping.from_slots(slots.tolist(), x.device))
    torch.testing.assert_close(lora_delta(x, y, a, b, slots), expected, **TOLERANCES[torch.float32])


def test_checks_shapes():
    x, y, a, b, slots = _inputs(torch.float32)
    with pytest.raises(ValueError, match="b must have shape"):
        lora_delta(x, y, a, b[:, :5], slots)
    with pytest.raises(ValueError, match="slots must have shape"):
        lora_delta(x, y, a, b, slots[:3])
