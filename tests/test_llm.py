"""Offline LLM against transformers: greedy parity for every architecture under prefix caching,
chunked prefill and preemption; logprobs; prompt logprobs. The rest of offline generation
(structured outputs, seeds, n > 1, stop strings, chat, bad input) is in test_llm_generation.py."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.test_model import ARCHS

MAX_NEW = 10


def prompts_for(vocab: int, lengths=(5, 23, 29), seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lengths]


_HF_CACHE: dict = {}


def hf_greedy(path, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    key = (str(path), tuple(prompt), max_new)
    if key not in _HF_CACHE:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
        )
        _HF_CACHE[key] = out[0, len(prompt) :].tolist()
    return _HF_CACHE[key]


CONFIGS = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 8},
    "preemption": {"num_gpu_blocks_override": 5, "max_model_len": 40, "block_size": 8},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(model_dirs, arch):
    path = model_dirs(arch)
    llm = None
    for name, kwargs in CONFIGS.items():
        llm = LLM(str(path), seed=0, **kwargs)
        prompts = prompts_for(llm.config.model.vocab_size)
        expected = [hf_greedy(path, p) for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        # one prompt alone, then the batch of different lengths (twice: the second run hits the prefix cache)
        single = llm.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)
        assert single[0].outputs[0].token_ids == expected[1], name
        for _ in range(2):
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == expected, name
        sched = llm.engine.scheduler
        if name == "preemption":
            assert sched.num_preemptions > 0
        if name == "default":
            assert sched.kv.prefix_hit_tokens > 0
        if name == "no_prefix_cache":
            assert sched.kv.prefix_hit_tokens == 0
        assert sched.kv.pool.num_free_blocks == llm.runner.num_blocks  # every block back


def test_logprobs_match_transformers(model_dirs):
    path = model_dirs("qwen2")
    llm = LLM(str(path))
    prompt = prompts_for(llm.config.model.vocab_size, lengths=(17,))[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, logprobs=5), use_tqdm=False)
    comp = out[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + comp.token_ids])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = torch.topk(row, 5)
        for tok, val in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tok].logprob == pytest.approx(val, abs=1e-4)
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))


@pytest.mark.parametrize("config", ["default", "chunked_prefill", "preemption"])
def test_prompt_logprobs_match_transformers(model_dirs, config):
    path = model_dirs("qwen2")
    llm = LLM(str(path), **CONFIGS[config])
    prompts = prompts_for(llm.config.model.vocab_size, lengths=(17, 12, 15), seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for i in range(1, len(prompt)):
            row, token = ref[i - 1], prompt[i]
            assert scored[i][token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert scored[i][token].rank == int((row > row[token]).sum()) + 1
            top = torch.topk(row, 3)
            assert all(scored[i][t].logprob == pytest.approx(v, abs=1e-4)
                       for t, v in zip(top.indices.tolist(), top.values.tolist()))
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 8)
    if config == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if config == "default":  # the same prompt again is scored in full, not served from the prefix cache
        again = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
        assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == len(prompts[0])
        plain = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
        assert plain.prompt_logprobs is None
