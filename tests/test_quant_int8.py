"""Weight-only int8 (quantization="int8"): the CPU kernel against its reference, the model's
weight memory, output quality against float32, and bad values."""

from __future__ import annotations

import argparse

import pytest
import torch

from kernels import int8_linear_cpu
from pagedserve import LLM, SamplingParams
from pagedserve.bench.quality import quality
from services.worker.quant.int8 import quantize_per_channel
from services.worker.quant.methods import linear_weight_bytes
from shared.engine_args import add_model_args

PROMPTS = [{"prompt_token_ids": [(5 * i + 11 * j) % 1000 + 10 for j in range(30 + 8 * i)]} for i in range(4)]
SCORED = SamplingParams(max_tokens=12, temperature=0, logprobs=1, prompt_logprobs=1)


def test_per_channel_quantization_round_trips_within_half_a_step():
    weight = torch.randn(32, 48) * torch.rand(32, 1)  # rows of different ranges
    weight[3] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (32,) and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.skipif(not int8_linear_cpu.available(), reason="no C compiler")
@pytest.mark.parametrize(("rows", "bias"), [(1, False), (5, True), (16, True)])
def test_cpu_kernel_matches_the_reference(rows, bias):
    weight, scale = quantize_per_channel(torch.randn(130, 200))
    x = torch.randn(rows, 200)
    b = torch.randn(130) if bias else None
    got = int8_linear_cpu.int8_linear(x, weight, scale, b)
    torch.testing.assert_close(got, int8_linear_cpu.int8_linear_ref(x, weight, scale, b), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(model_dirs):
    path = model_dirs("llama")
    out = {}
    for method in (None, "int8"):
        llm = LLM(str(path), quantization=method, kv_cache_memory=1 << 20)
        out[method] = (llm, llm.generate(PROMPTS, SCORED, use_tqdm=False))
    return out


def test_linear_weights_take_a_quarter_of_float32(runs):
    full, quantized = (linear_weight_bytes(runs[m][0].runner.model) for m in (None, "int8"))
    # int8 weights plus one float32 scale per row of 64 (tiny model) inputs: 64 / (64 + 4) of 4x
    assert full / quantized >= 4 * 64 / 68 - 1e-6
    assert runs["int8"][0].runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8


def test_quality_against_float32(runs):
    """Measured on this random tiny model: 94% top-1 agreement, mean |logprob difference| 0.04."""
    agreement, mean_diff = quality(runs[None][1], runs["int8"][1])
    assert agreement >= 0.85 and mean_diff <= 0.1, (agreement, mean_diff)


def test_bad_values_are_refused(model_dirs):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(model_dirs("llama")), quantization="int3")
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_model_args(parser)
    assert parser.parse_args(["-q", "int8"]).quantization == "int8"
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--quantization", "awq4"])
