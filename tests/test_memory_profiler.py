"""KV sizing from a profiling step, checked without CUDA: the budget arithmetic, the dummy step's
shape, and that the step itself runs (on CPU, with the torch backend) without touching the RNG.
tests/test_gpu_path.py checks the measured headroom on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.worker.kv_cache import kv_block_bytes
from services.worker.layers.attention_torch import TorchAttentionBackend
from services.worker.loader import build_model
from services.worker.memory_profiler import (
    MemoryProfile,
    dummy_prefill_metadata,
    kv_cache_budget,
    profile_prompt_lengths,
    profile_step,
)
from shared.config import EngineConfig, ModelConfig, SchedulerConfig

GIB = 2**30


def test_budget_is_the_utilized_share_minus_the_profiled_peak():
    assert kv_cache_budget(80 * GIB, 0.9, 20 * GIB) == int(80 * GIB * 0.9) - 20 * GIB
    assert kv_cache_budget(80 * GIB, 0.5, 50 * GIB) == 0  # never negative
    # plenty free: the utilization bound decides
    assert kv_cache_budget(80 * GIB, 0.9, 20 * GIB, free=70 * GIB, activations=4 * GIB) == 52 * GIB
    # another process holds memory: what is free, less the activations still to come, decides
    assert kv_cache_budget(80 * GIB, 0.9, 20 * GIB, free=30 * GIB, activations=4 * GIB) == 26 * GIB
    assert kv_cache_budget(80 * GIB, 0.9, 20 * GIB, free=30 * GIB, activations=4 * GIB, reserve=GIB) == 25 * GIB
    assert kv_cache_budget(80 * GIB, 0.9, 20 * GIB, free=3 * GIB, activations=4 * GIB) == 0
    profile = MemoryProfile(total=80 * GIB, utilization=0.9, weights=16 * GIB, peak=20 * GIB, free=60 * GIB,
                            kv_budget=52 * GIB)
    assert profile.activations == 4 * GIB


@pytest.mark.parametrize(
    "tokens,max_seqs,max_len,expected",
    [
        (2048, 128, 4096, [2048]),
        (2048, 128, 1024, [1024, 1024]),
        (100, 4, 30, [30, 30, 30, 10]),
        (5000, 2, 1000, [1000, 1000]),  # no more prompts than the scheduler can run at once
        (7, 1, 7, [7]),
    ],
)
def test_profile_prompt_lengths(tokens, max_seqs, max_len, expected):
    assert profile_prompt_lengths(tokens, max_seqs, max_len) == expected


def test_dummy_prefill_metadata_lays_prompts_on_consecutive_blocks():
    common, num_blocks = dummy_prefill_metadata([20, 5], 16, torch.device("cpu"))
    assert num_blocks == 3
    assert common.block_tables == [[0, 1], [2]]
    assert common.query_start_loc == [0, 20, 25] and common.seq_lens == [20, 5] and common.num_decodes == 0
    assert common.slot_mapping.tolist() == list(range(20)) + list(range(32, 37))


def test_profile_step_runs_the_full_budget_without_moving_the_rng(model_dirs):
    model_config = ModelConfig.from_pretrained(str(model_dirs("qwen2")), max_model_len=48)
    config = EngineConfig(model=model_config, scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100))
    model = build_model(model_config, torch.float32, "cpu")
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    temp_bytes = profile_step(model, TorchAttentionBackend(), config, torch.float32, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draw)
    # prompts of 48 + 48 + 4 tokens: 3 + 3 + 1 blocks of 16
    assert temp_bytes == 7 * kv_block_bytes(config, torch.float32)
    small = dataclasses.replace(config, scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100))
    assert profile_step(model, TorchAttentionBackend(), small, torch.float32, torch.device("cpu")) == (
        3 * kv_block_bytes(config, torch.float32)
    )
