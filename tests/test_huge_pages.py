"""The worker's weights and KV cache in huge-page memory (services/worker/huge_pages.py): the
model computes exactly what it computed before the move, tied weights stay one tensor, the
arena is 2 MiB-aligned and, where the kernel gives transparent huge pages on request, backed by
them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from services.worker import huge_pages
from services.worker.kv_cache import allocate_kv_cache
from services.worker.loader import build_model
from shared.config import CacheConfig, EngineConfig, ModelConfig

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_on_request() -> bool:
    return THP.is_file() and "[never]" not in THP.read_text()


def huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages of the mapping holding t's first byte, from /proc/self/smaps."""
    address, found = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if m := re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line):
            found = int(m[1], 16) <= address < int(m[2], 16)
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_zeros_are_zero_aligned_and_huge_where_the_kernel_allows():
    t = huge_pages.zeros(5 << 20)
    assert t.numel() == 5 << 20 and t.dtype == torch.uint8 and not t.any()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    if thp_on_request():
        assert huge_kb(t) >= 4096  # the two whole 2 MiB pages at least


def test_moved_weights_compute_the_same_and_tied_ones_stay_one(model_dirs):
    config = ModelConfig.from_pretrained(str(model_dirs("qwen2")))
    original = huge_pages.move_weights
    huge_pages.move_weights = lambda model: None  # built where torch allocates
    try:
        before = build_model(config, torch.float32, "cpu")
    finally:
        huge_pages.move_weights = original
    after = build_model(config, torch.float32, "cpu")
    assert after.lm_head.weight is after.model.embed_tokens.weight
    params = dict(after.named_parameters())
    assert len(params) == len(dict(before.named_parameters()))
    for name, p in before.named_parameters():
        assert torch.equal(params[name], p), name
        assert getattr(params[name], "weight_loader", None) is not None or not hasattr(p, "weight_loader"), name
    addresses = sorted(p.data_ptr() for p in params.values())
    assert addresses[0] % huge_pages.HUGE_PAGE == 0  # one arena, from its aligned start
    arena_bytes = sum(huge_pages._aligned(p.numel() * p.element_size()) for p in params.values())
    assert addresses[-1] - addresses[0] < arena_bytes + sum(b.numel() * b.element_size() for b in after.buffers())
    hidden = torch.randn(3, config.hidden_size)
    assert torch.equal(after.compute_logits(hidden), before.compute_logits(hidden))


def test_the_kv_cache_is_zeroed_per_layer_in_one_arena(model_dirs):
    config = EngineConfig(ModelConfig.from_pretrained(str(model_dirs("llama"))), CacheConfig(block_size=16))
    caches = allocate_kv_cache(config, 40, torch.float32, torch.device("cpu"))
    assert len(caches) == config.model.num_layers
    for cache in caches:
        assert cache.shape == (2, 40, 16, config.model.num_kv_heads, config.model.head_dim) and not cache.any()
    assert caches[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    caches[0].fill_(1.0)  # each layer its own memory
    assert not caches[1].any()


def test_generation_is_token_for_token_the_same_with_weights_and_cache_moved(model_dirs, monkeypatch):
    from pagedserve import LLM
    from shared.sampling_params import SamplingParams

    path, params = str(model_dirs("llama")), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5 + i, 40 + 3 * i))} for i in range(4)]

    def run() -> list[list[int]]:
        llm = LLM(path, max_model_len=128, kv_cache_memory=4 << 20)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    moved = run()
    monkeypatch.setattr(huge_pages, "move_weights", lambda model: None)
    monkeypatch.setattr(huge_pages, "zeros_like_each", lambda shapes, dtype: [torch.zeros(s, dtype=dtype) for s in shapes])
    assert run() == moved
