"""The worker's GPU execution path on a real CUDA device (skipped without one): decode and verify
steps replaying CUDA graphs give the eager tokens, the KV cache sized from gpu_memory_utilization after
the profiling step leaves the expected headroom, and pinned host copies arrive intact.

tests/test_cuda_graphs.py and tests/test_memory_profiler.py check the same logic on CPU."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from pagedserve import LLM, SamplingParams
from services.worker.kv_cache import cache_bytes, kv_block_bytes
from services.worker.memory_profiler import FREE_MEMORY_RESERVE, kv_cache_budget
from services.worker.transfer import copy_from_host, tensor_to_device, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GIB = 2**30
UTILIZATION = 0.3  # small, so each LLM allocates quickly and two never crowd the device


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _generate(path, prompts, params, **kwargs):
    """Completions and graph replay count of a fresh LLM, released before returning."""
    llm = LLM(str(path), gpu_memory_utilization=UTILIZATION, enable_prefix_caching=False, **kwargs)
    graphs = llm.runner.decode_graphs
    assert (graphs is None) == kwargs.get("enforce_eager", False)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    replays = graphs.replays if graphs is not None else 0
    del llm, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return outs, replays


def _prompts(count: int) -> list[dict]:
    """count prompts of 3, 10, 17, ... token ids in [10, 990): inside every test model's vocabulary."""
    return [{"prompt_token_ids": [(11 * i + 5 * j) % 980 + 10 for j in range(3 + 7 * i)]} for i in range(count)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_graph_replay_gives_the_eager_tokens(model_dirs, arch):
    """float32: batches shrink from 7 to 1 as requests finish, through padded buckets (8, 4, 2, 1)."""
    path = model_dirs(arch)
    prompts = _prompts(7)
    params = [SamplingParams(temperature=0, max_tokens=3 + 3 * i, ignore_eos=True, logprobs=0) for i in range(7)]
    eager, none = _generate(path, prompts, params, enforce_eager=True, max_num_seqs=16)
    graphed, replays = _generate(path, prompts, params, max_num_seqs=16)
    assert none == 0 and replays == 20  # every decode step: 3 + 3 * 6 - 1 of them
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    for got, want in zip(graphed, eager):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_graph_replay_in_bfloat16_with_sampling(model_dirs):
    """bfloat16 and random sampling through graphs: finite logprobs, every token produced."""
    path = model_dirs("qwen2", "small")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
    outs, replays = _generate(path, _prompts(5), params, dtype="bfloat16", max_num_seqs=8)
    assert replays == 11
    for c in outs:
        assert len(c.token_ids) == 12 and math.isfinite(c.cumulative_logprob)


def test_verify_steps_replay_their_graphs_with_the_eager_tokens(model_dirs):
    """Speculative decoding: prompt lookup's proposals verified through the verify graphs give the
    eager tokens, for prompts that end in a loop of their model's greedy output."""
    path = model_dirs("llama", attention_scale=0.005)
    starts = [[(5 * i + 3 * j) % 1000 + 10 for j in range(4 + 2 * i)] for i in range(3)]
    looped, _ = _generate(path, [{"prompt_token_ids": p} for p in starts],
                          SamplingParams(temperature=0.0, max_tokens=40), enforce_eager=True)
    prompts = [{"prompt_token_ids": p + list(c.token_ids)} for p, c in zip(starts, looped)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    eager, _ = _generate(path, prompts, params, enforce_eager=True, speculative_config=spec, max_num_seqs=8)
    graphed, replays = _generate(path, prompts, params, speculative_config=spec, max_num_seqs=8)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    assert 0 < replays < 15  # verify steps take up to 4 tokens per request
    for got, want in zip(graphed, eager):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_kv_cache_fills_the_utilized_share_after_the_profiled_peak(model_dirs):
    free_before, total = torch.cuda.mem_get_info()
    llm = LLM(str(model_dirs("llama")), gpu_memory_utilization=UTILIZATION, max_model_len=512,
              max_num_batched_tokens=512, max_num_seqs=16)
    runner, profile = llm.runner, llm.runner.memory_profile
    assert profile is not None and profile.total == total and profile.utilization == UTILIZATION
    assert 0 < profile.weights <= profile.peak
    per_block = kv_block_bytes(llm.config, runner.dtype)
    kv = cache_bytes(runner.kv_caches)
    assert kv == runner.num_blocks * per_block
    assert profile.kv_budget == kv_cache_budget(
        total, UTILIZATION, profile.peak, profile.free, profile.activations, FREE_MEMORY_RESERVE
    )
    assert kv <= profile.kv_budget < kv + per_block
    assert profile.peak + kv <= total * UTILIZATION  # weights + activations + KV within the share
    uncrowded = profile.free - profile.activations - FREE_MEMORY_RESERVE >= int(total * UTILIZATION) - profile.peak
    if uncrowded:  # the brief's arithmetic exactly
        assert profile.kv_budget == int(total * UTILIZATION) - profile.peak
    # the engine took its share and little more (CUDA graph pool, allocator rounding)
    assert free_before - torch.cuda.mem_get_info()[0] <= total * UTILIZATION + 2 * GIB
    # a step as large as the profiled one stays within the share (slack: the capture stream's
    # cuBLAS workspace and the graphs' outputs, allocated after profiling)
    torch.cuda.reset_peak_memory_stats()
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=4, ignore_eos=True, logprobs=5)
    llm.generate([{"prompt_token_ids": [10 + j % 500 for j in range(500)]}], params, use_tqdm=False)
    assert torch.cuda.max_memory_allocated() <= total * UTILIZATION + 256 * 2**20


def test_pinned_host_copies_arrive_intact():
    device = torch.device("cuda")
    values = list(range(-5, 1000))
    assert tensor_to_device(values, torch.int32, device).tolist() == values
    host = torch.arange(4096, dtype=torch.int64)
    assert torch.equal(to_device(host, device).cpu(), host)
    dst = torch.zeros(8, 16, dtype=torch.int32, device=device)
    copy_from_host(dst[:3, :5], torch.arange(15, dtype=torch.int32).view(3, 5))  # strided destination
    assert dst[:3, :5].flatten().tolist() == list(range(15)) and int(dst[3:].abs().sum()) == 0
