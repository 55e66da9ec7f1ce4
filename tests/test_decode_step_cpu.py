"""The CPU decode step as one C call (kernels/decode_step_cpu.c, chosen by
services/worker/models/llama_decode_cpu.py) against the layers' own torch forward: the same
tokens and logprobs, which models and steps take it, and indices it refuses."""

from __future__ import annotations

import pytest
import torch

from kernels import decode_step_cpu
from pagedserve import LLM, SamplingParams
from services.worker.loader import build_model
from services.worker.models import llama_decode_cpu
from shared.config import ModelConfig

pytestmark = pytest.mark.skipif(not decode_step_cpu.available(), reason="no C compiler")

PROMPTS = [[5, 9, 31, 2, 77], [8] * 21, list(range(40, 73))]
MANY = [[3 + i, 7 * i % 50 + 1, 11] for i in range(40)]  # steps of 40 tokens: the packed panels


def _generate(path, monkeypatch, fused: bool, prompts=PROMPTS, max_tokens=12, max_num_seqs=4, dtype="float32",
              **kwargs) -> tuple[list, list[int]]:
    """The completions, and the tokens of each step the C path ran."""
    steps = []
    run = llama_decode_cpu.run

    def counted(model, positions, hidden):
        out = run(model, positions, hidden) if fused else None
        if out is not None:
            steps.append(hidden.shape[0])
        return out

    monkeypatch.setattr(llama_decode_cpu, "run", counted)
    llm = LLM(str(path), dtype=dtype, max_num_seqs=max_num_seqs, block_size=8, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    return [o.outputs[0] for o in outs], steps


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", {}), ("qwen2", {}), ("llama", {"quantization": "int8"}), ("llama", {"kv_cache_dtype": "fp8"}),
    ("qwen2", {"kv_cache_dtype": "fp8_e5m2"}),
], ids=["llama", "qwen2", "llama-int8", "llama-fp8", "qwen2-fp8_e5m2"])
def test_c_step_matches_the_layers(model_dirs, monkeypatch, arch, kwargs):
    """Three requests of different lengths (contexts across several blocks) decode together:
    every decode step runs in C, with the tokens and logprobs the torch layers give (int8
    weights: through the int8 kernel in both; an fp8 cache: the same bytes written and read)."""
    path = model_dirs(arch)
    fused, fused_steps = _generate(path, monkeypatch, fused=True, **kwargs)
    plain, plain_steps = _generate(path, monkeypatch, fused=False, **kwargs)
    assert len(fused_steps) >= 11 and not plain_steps
    _same(fused, plain)


def test_c_step_on_packed_panels_matches_the_layers(model_dirs, monkeypatch):
    """40 requests decoding together: steps of more than 16 tokens, where the linear kernel runs
    its packed panels (kernels/f32_linear_cpu.c), still in one C call and with the layers'
    tokens and logprobs."""
    path, prompts = model_dirs("llama"), MANY
    fused, fused_steps = _generate(path, monkeypatch, True, prompts, 6, max_num_seqs=40)
    plain, _ = _generate(path, monkeypatch, False, prompts, 6, max_num_seqs=40)
    assert fused_steps.count(40) == 5  # every decode step (the prompts, 120 tokens, too)
    _same(fused, plain)


def test_speculative_verification_takes_the_c_step(model_dirs, monkeypatch):
    """ngram proposals verified several tokens per request in one C step (each token attending up
    to itself), with the tokens and logprobs of plain decoding through the layers."""
    path, prompts = model_dirs("llama", attention_scale=0.005), [[5, 6] * 10]  # its output loops after a while
    spec = {"method": "ngram", "num_speculative_tokens": 4}
    fused, fused_steps = _generate(path, monkeypatch, True, prompts, 48, speculative_config=spec)
    plain, _ = _generate(path, monkeypatch, False, prompts, 48)
    assert max(fused_steps) > 1  # a verify step: one request, several tokens
    _same(fused, plain)


@pytest.mark.parametrize(("prompts", "seqs"), [(PROMPTS, 4), (MANY, 40)], ids=["3-requests", "40-requests"])
def test_a_bfloat16_model_steps_in_c_within_bfloat16s_rounding(model_dirs, monkeypatch, prompts, seqs):
    """A bfloat16 model decodes in the C step (float32 sums over its bfloat16 weights and cache;
    from 16 rows on, with AVX512-BF16, rows rounded to bfloat16 for its dot products). Scored
    teacher-forced by the float32 model over the same tokens, each token it chose is within 0.1
    nats of float32's best there, and its logprob within 0.15 of float32's for it: the rounding of
    bfloat16 (the bfloat16 layers' own logprobs were up to 0.13 off, the C step's 0.07 and 0.10
    here), where misread weights or cache entries would give unrelated logits."""
    path = model_dirs("llama")
    fused, steps = _generate(path, monkeypatch, True, prompts, 12 if seqs < 40 else 6, seqs, dtype="bfloat16")
    assert len(steps) >= 5 and max(steps) >= len(prompts)
    llm = LLM(str(path), dtype="float32", block_size=8)
    score = SamplingParams(max_tokens=1, prompt_logprobs=1)
    for prompt, out in zip(prompts, fused, strict=True):
        [ref] = llm.generate([{"prompt_token_ids": prompt + out.token_ids}], score, use_tqdm=False)
        for i, token in enumerate(out.token_ids):
            there = ref.prompt_logprobs[len(prompt) + i]
            assert there[token].logprob >= max(lp.logprob for lp in there.values()) - 0.1
            assert out.logprobs[i][token].logprob == pytest.approx(there[token].logprob, abs=0.15)


def _same(fused: list, plain: list) -> None:
    for a, b in zip(fused, plain, strict=True):
        assert a.token_ids == b.token_ids
        for ea, eb in zip(a.logprobs, b.logprobs):
            assert ea.keys() == eb.keys()
            for token in ea:
                assert ea[token].logprob == pytest.approx(eb[token].logprob, abs=1e-4)


@pytest.mark.parametrize(("arch", "qualifies"), [("llama", True), ("mistral", True), ("qwen3", False),
                                                 ("gemma", False)])
def test_which_models_take_the_c_step(model_dirs, arch, qualifies):
    """Per-head q/k norms (Qwen3) and Gemma's norms and GELU are not in the C step."""
    config = ModelConfig.from_pretrained(str(model_dirs(arch)))
    model = build_model(config, torch.float32, "cpu")
    assert (llama_decode_cpu._layers(model.model) is not None) is qualifies


def test_indices_outside_the_cache_are_refused():
    cache = torch.zeros(2, 4, 8, 1, 8)  # 4 blocks of 8 slots
    table, seq_lens = torch.tensor([[1, 2]]), torch.tensor([9])
    ok = (torch.tensor([8]), torch.tensor([17]), table, None, seq_lens, cache, 64)
    llama_decode_cpu._check(*ok)
    llama_decode_cpu._check(*ok[:3], torch.tensor([0]), *ok[4:])
    with pytest.raises(IndexError, match="positions"):
        llama_decode_cpu._check(torch.tensor([64]), *ok[1:])
    with pytest.raises(IndexError, match="KV cache"):
        llama_decode_cpu._check(ok[0], torch.tensor([32]), *ok[2:])
    with pytest.raises(IndexError, match="KV cache"):
        llama_decode_cpu._check(*ok[:2], torch.tensor([[1, 4]]), *ok[3:])
    with pytest.raises(IndexError, match="table row"):
        llama_decode_cpu._check(*ok[:3], torch.tensor([1]), *ok[4:])
    with pytest.raises(IndexError, match="one block table row per token"):
        llama_decode_cpu._check(*ok[:4], torch.tensor([9, 9]), *ok[5:])
    with pytest.raises(IndexError, match="block table"):
        llama_decode_cpu._check(*ok[:4], torch.tensor([17]), *ok[5:])
