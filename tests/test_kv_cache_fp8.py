"""FP8 KV cache end to end on CPU (the torch backend and the C decode kernel): the block count a
KV budget gives, scales from the checkpoint or measured, output quality against the model-dtype
cache, and bad values."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import kv_write_cpu
from pagedserve import LLM, SamplingParams
from pagedserve.bench.quality import quality
from services.worker.kv_cache import cache_bytes
from services.worker.quant.kv_fp8 import quantize, write_cache
from shared.engine_args import add_model_args

BUDGET = 1 << 20
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 10 for j in range(40 + 9 * i)]} for i in range(4)]
SCORED = SamplingParams(max_tokens=12, temperature=0, logprobs=1, prompt_logprobs=1)


def _llm(path, kv_cache_dtype: str = "auto", **kwargs) -> LLM:
    # small chunks: prompt chunks after the first read earlier ones back from the (fp8) cache
    return LLM(str(path), kv_cache_dtype=kv_cache_dtype, kv_cache_memory=BUDGET, max_num_batched_tokens=32,
               enable_prefix_caching=False, **kwargs)


@pytest.fixture(scope="module")
def llama(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def runs(llama):
    """name -> (LLM, outputs of the scored prompts) for auto, fp8 and fp8_e5m2."""
    out = {}
    for name in ("auto", "fp8", "fp8_e5m2"):
        llm = _llm(llama, name)
        out[name] = (llm, llm.generate(PROMPTS, SCORED, use_tqdm=False))
    return out


def test_the_same_budget_holds_4x_the_blocks_of_float32(runs):
    auto, fp8 = runs["auto"][0].runner, runs["fp8"][0].runner
    assert auto.kv_caches[0].dtype == torch.float32 and fp8.kv_caches[0].dtype == torch.float8_e4m3fn
    assert runs["fp8_e5m2"][0].runner.kv_caches[0].dtype == torch.float8_e5m2
    assert fp8.num_blocks == 4 * auto.num_blocks
    assert cache_bytes(fp8.kv_caches) == cache_bytes(auto.kv_caches) <= BUDGET


def test_the_same_budget_holds_2x_the_blocks_of_bfloat16(llama):
    blocks = [_llm(llama, name, dtype="bfloat16").runner.num_blocks for name in ("auto", "fp8")]
    assert blocks[1] == 2 * blocks[0]


@pytest.mark.parametrize(("name", "min_agreement", "max_mean_diff"), [("fp8", 0.75, 0.2), ("fp8_e5m2", 0.55, 0.35)])
def test_quality_against_the_model_dtype_cache(runs, name, min_agreement, max_mean_diff):
    """Bounds measured on this random tiny model (sharper than real ones: 2 layers of weights
    drawn at 0.2 std): e4m3 agreed on 84% of top-1 tokens with a mean difference of 0.12, e5m2
    (one mantissa bit fewer) 68% and 0.23."""
    agreement, mean_diff = quality(runs["auto"][1], runs[name][1])
    assert agreement >= min_agreement and mean_diff <= max_mean_diff, (agreement, mean_diff)


def _with_scales(src, dst, scales: dict[str, torch.Tensor]):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file({**weights, **scales}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_scales_from_the_checkpoint_are_used(runs, llama, tmp_path):
    """Measured scales written into the checkpoint give the same tokens; other scales are read as given."""
    measured = [(a.k_scale, a.v_scale) for a in runs["fp8"][0].runner.model.modules() if hasattr(a, "k_scale")]
    scales = {}
    for i, (k, v) in enumerate(measured):
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    llm = _llm(_with_scales(llama, tmp_path / "same", scales), "fp8")
    greedy = SamplingParams(max_tokens=12, temperature=0)
    again = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in runs["fp8"][1]]
    kv = {"model.layers.0.self_attn.kv_scale": torch.tensor([0.25]), "model.layers.1.self_attn.attn.k_scale": torch.tensor(2.0)}
    llm = _llm(_with_scales(llama, tmp_path / "given", kv), "fp8")
    layers = [a for a in llm.runner.model.modules() if hasattr(a, "k_scale")]
    assert (layers[0].k_scale, layers[0].v_scale, layers[1].k_scale) == (0.25, 0.25, 2.0)


@pytest.mark.parametrize(("scale", "message"), [
    (torch.tensor(-1.0), "must be a positive finite number"),
    (torch.tensor(float("nan")), "must be a positive finite number"),
    (torch.ones(2), "must be one number per layer"),
])
def test_a_bad_checkpoint_scale_is_a_clear_error(llama, tmp_path, scale, message):
    path = _with_scales(llama, tmp_path / "bad", {"model.layers.0.self_attn.k_scale": scale})
    with pytest.raises(ValueError, match=message):
        _llm(path, "fp8")


def test_a_bad_kv_cache_dtype_is_refused(llama):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(str(llama), kv_cache_dtype="int4")
    import argparse

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_model_args(parser)
    assert parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"]).kv_cache_dtype == "fp8_e5m2"
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--kv-cache-dtype", "fp16"])


def test_a_prompt_prefilled_alone_gives_what_it_gives_in_a_batch(runs):
    """A lone fresh prompt attends over its keys as the fp8 cache holds them, as batched ones do."""
    llm, batched = runs["fp8"]
    for prompt, together in zip(PROMPTS[:2], batched):
        alone = llm.generate([prompt], SCORED, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == together.outputs[0].token_ids
        for a, b in zip(alone.outputs[0].logprobs, together.outputs[0].logprobs):
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


@pytest.mark.skipif(not kv_write_cpu.usable(torch.empty(1, 1, 1, 8, dtype=torch.float8_e4m3fn), torch.empty(1)),
                    reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_the_cpu_write_stores_the_bytes_torch_does(dtype):
    """Every finite fp8 value, the midpoints between neighbours (ties round to even) and just
    either side of them, subnormals, zeros of both signs, values past the largest (saturated) and
    random ones, divided by a scale that is not a power of two."""
    scale = 0.37
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(grid[1:]), mids.nextafter(grid[:-1]), torch.tensor([-0.0, 1e6, -1e6]),
                        torch.randn(2000) * 30, torch.randn(500) * 1e-3])
    x = values * scale
    x = torch.cat([x, x.new_zeros(-len(x) % 64)]).view(-1, 2, 32)  # tokens of 2 heads x 32
    cache = torch.zeros(x.shape[0] + 3, 1, 2, 32, dtype=dtype)
    slots = torch.randperm(cache.shape[0])[: x.shape[0]]
    write_cache(cache, slots, x, scale)
    want = quantize(x, scale, dtype).view(torch.uint8)
    assert torch.equal(cache.view(torch.uint8).view(-1, 2, 32)[slots], want)
    with pytest.raises(IndexError, match="out of range"):
        write_cache(cache, torch.tensor([cache.shape[0]]), x[:1], scale)
