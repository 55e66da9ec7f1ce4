"""Weight-only int8 (quantization="int8"): the CPU kernel against its reference, the model's
weight memory, output quality against float32, and bad values."""

from __future__ import annotations

import argparse

import pytest
import torch

from kernels import cpu_build, f32_linear_cpu, int8_linear_cpu
from pagedserve import LLM, SamplingParams
from pagedserve.bench.quality import quality
from services.worker import step_threads
from services.worker.quant.int8 import Int8Weights, quantize_per_channel
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
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (7, 64), (130, 200), (1030, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_the_reference(rows, n, k, bias):
    """Every tile shape: 3, 2 or 1 rows at a time, 4 or 1 weight rows, split over the threads."""
    torch.manual_seed(rows * 1000 + n + k)
    weight, scale = quantize_per_channel(torch.randn(n, k))
    x = torch.randn(rows, k)
    b = torch.randn(n) if bias else None
    assert int8_linear_cpu.usable(x, weight)
    got = int8_linear_cpu.int8_linear(x, weight, scale, b)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, int8_linear_cpu.int8_linear_ref(x, weight, scale, b), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not int8_linear_cpu.available(), reason="no C compiler")
def test_the_layer_takes_the_kernel_for_few_rows_and_torch_past_them():
    weight, scale = quantize_per_channel(torch.randn(24, 64))
    layer, b = Int8Weights(weight, scale), torch.randn(24)
    for rows in (1, int8_linear_cpu.MAX_ROWS, int8_linear_cpu.MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        assert int8_linear_cpu.usable(x, weight) == (rows <= int8_linear_cpu.MAX_ROWS)
        torch.testing.assert_close(layer(x, b), int8_linear_cpu.int8_linear_ref(x, weight, scale, b), atol=1e-4,
                                   rtol=1e-5)
    assert torch.equal(int8_linear_cpu.dequantize(weight, scale), weight.float() * scale[:, None])  # past MAX_ROWS
    odd, odd_scale = quantize_per_channel(torch.randn(5, 60))  # K not a multiple of 8: the reference runs
    x = torch.randn(2, 60)
    assert not int8_linear_cpu.usable(x, odd)
    torch.testing.assert_close(Int8Weights(odd, odd_scale)(x, None), int8_linear_cpu.int8_linear_ref(x, odd, odd_scale, None))


@pytest.mark.skipif(torch.get_num_threads() < 2 or not int8_linear_cpu.available(), reason="one thread or no compiler")
def test_decode_sized_int8_steps_keep_the_kernel_on_every_thread():
    """An int8 model computes in float32, so its decode-sized steps run torch on one thread, and
    every such step's matmuls go through the kernel, which keeps all the threads."""
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    assert int8_linear_cpu.MAX_ROWS >= f32_linear_cpu.MAX_ROWS  # no decode-sized matmul left to one-thread torch
    with step_threads.for_step(cpu, torch.float32, f32_linear_cpu.MAX_ROWS):
        assert torch.get_num_threads() == 1 and cpu_build.threads() == before


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
