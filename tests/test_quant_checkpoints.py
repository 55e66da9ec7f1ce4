"""Pre-quantized checkpoints: compressed-tensors int8, written by quantizing a random model in the
format's layout, load as the format dequantizes (W = weight * weight_scale) and decode exactly as
quantization="int8" over the unquantized checkpoint does; unsupported schemes fail naming them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pagedserve import LLM, SamplingParams
from pagedserve.test_quant_model import quantize_checkpoint

PROMPTS = [{"prompt_token_ids": [(3 * i + 13 * j) % 1000 + 10 for j in range(20 + 6 * i)]} for i in range(3)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=1)


@pytest.fixture(scope="module")
def checkpoints(model_dirs, tmp_path_factory):
    base = model_dirs("qwen2")  # fused qkv with biases, tied embeddings
    return base, quantize_checkpoint(base, tmp_path_factory.mktemp("ct") / "int8")


def test_the_layout_dequantizes_to_the_weights(checkpoints):
    base, quantized = checkpoints
    full, packed = load_file(base / "model.safetensors"), load_file(quantized / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    q, scale = packed[name], packed["model.layers.0.self_attn.k_proj.weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    assert ((q.float() * scale - full[name].float()).abs() <= scale / 2 + 1e-7).all()
    assert packed["model.embed_tokens.weight"].dtype == full["model.embed_tokens.weight"].dtype
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"


def test_decodes_like_int8_over_the_unquantized_checkpoint(checkpoints):
    base, quantized = checkpoints
    llm = LLM(str(quantized), kv_cache_memory=1 << 20)
    assert llm.config.model.quantization == "compressed-tensors"
    layer = llm.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.int8 and layer.quant is not None
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    want = LLM(str(base), quantization="int8", kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for a, b in zip(got, want):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


@pytest.mark.parametrize(("change", "message"), [
    ({"quant_method": "gptq"}, "quantized with 'gptq', which is not supported"),
    ({"format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     r"weights \(4, 'int', 'group', True\)"),
])
def test_unsupported_schemes_fail_naming_them(checkpoints, tmp_path, change, message):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints[1], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        LLM(str(path), kv_cache_memory=1 << 20)


def test_asking_for_another_quantization_is_an_error(checkpoints):
    with pytest.raises(ValueError, match="quantization int8 was asked for, but the checkpoint is quantized"):
        LLM(str(checkpoints[1]), quantization="int8")
    with pytest.raises(ValueError, match="needs a checkpoint quantized so"):
        LLM(str(checkpoints[0]), quantization="compressed-tensors")
