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
    ({"quant_method": "bitsandbytes"}, "quantized with 'bitsandbytes', which is not supported"),
    ({"format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     r"weights \(4, 'int', 'group', True\)"),
    ({"format": "float-quantized"}, "not supported in format 'float-quantized'"),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                              "input_activations": {"num_bits": 8, "type": "int", "strategy": "group", "dynamic": True}}}},
     r"dynamic input_activations \(8, 'int', 'group', True\)"),
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


# FP8 weights and W8A8 (compressed-tensors "float-quantized", and int8 with dynamic activations)


def _float_reference(quantized, dst):
    """The checkpoint with every FP8 weight replaced by weight * weight_scale (the format's dequantization)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(quantized, dst)
    tensors = load_file(quantized / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = name.removesuffix("weight_scale")
        tensors[prefix + "weight"] = tensors[prefix + "weight"].float() * tensors.pop(name).float()
        tensors.pop(prefix + "input_scale", None)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def fp8_checkpoints(checkpoints, tmp_path_factory):
    base = checkpoints[0]
    root = tmp_path_factory.mktemp("ct8")
    built = {s: quantize_checkpoint(base, root / s, s) for s in
             ("compressed-tensors-fp8", "compressed-tensors-fp8-tensor", "compressed-tensors-w8a8")}
    built["reference-fp8-tensor"] = _float_reference(built["compressed-tensors-fp8-tensor"], root / "ref-tensor")
    built["reference-fp8"] = _float_reference(built["compressed-tensors-fp8"], root / "ref-channel")
    return built


@pytest.mark.parametrize("scheme", ["compressed-tensors-fp8", "compressed-tensors-fp8-tensor"])
def test_fp8_layout_dequantizes_to_the_weights(checkpoints, fp8_checkpoints, scheme):
    full, packed = load_file(checkpoints[0] / "model.safetensors"), load_file(fp8_checkpoints[scheme] / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    q, scale = packed[name], packed["model.layers.0.mlp.down_proj.weight_scale"]
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((q.shape[0], 1) if scheme.endswith("fp8") else (1,))
    error = (q.float() * scale - full[name].float()).abs()
    assert (error <= full[name].float().abs() / 16 + scale * 2.0 ** -9).all()  # e4m3: 3 mantissa bits


def test_fp8_per_tensor_decodes_like_its_dequantized_weights(fp8_checkpoints):
    llm = LLM(str(fp8_checkpoints["compressed-tensors-fp8-tensor"]), kv_cache_memory=1 << 20)
    qkv = llm.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant is None and qkv.weight.dtype == torch.float32  # static activation scales: W8A16
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    want = LLM(str(fp8_checkpoints["reference-fp8-tensor"]), kv_cache_memory=1 << 20).generate(
        PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for a, b in zip(got, want):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def _per_token_reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Each row to 8 bits with scale max|row| / (127 or 448), and back."""
    limit = 127.0 if kind == "int" else 448.0
    scale = x.abs().amax(dim=1, keepdim=True) / limit
    q = (x / scale).round().clamp(-127, 127) if kind == "int" else (x / scale).to(torch.float8_e4m3fn).float()
    return q * scale


# fp8 e4m3 keeps 3 mantissa bits of each activation, int8 a 127th of the row's largest: on these
# random tiny models (large logits) the mean prompt logprob moves by about 0.15 and 0.05
@pytest.mark.parametrize(("scheme", "kind", "mean_diff"), [("compressed-tensors-fp8", "float", 0.3),
                                                           ("compressed-tensors-w8a8", "int", 0.1)])
def test_dynamic_activation_quantization(checkpoints, fp8_checkpoints, scheme, kind, mean_diff):
    llm = LLM(str(fp8_checkpoints[scheme]), kv_cache_memory=1 << 20)
    tensors = load_file(fp8_checkpoints[scheme] / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj."
    weight = tensors[prefix + "weight"].float() * tensors[prefix + "weight_scale"]
    layer = llm.runner.model.model.layers[1].mlp.down_proj
    x = torch.randn(5, weight.shape[1])
    torch.testing.assert_close(layer(x), _per_token_reference(x, kind) @ weight.t(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(layer(x), x @ weight.t(), atol=1e-4, rtol=1e-4)  # the activations were quantized
    # against the same weights with float activations: close prompt logprobs, not the same ones
    reference = LLM(str(checkpoints[1] if kind == "int" else fp8_checkpoints["reference-fp8"]),
                    kv_cache_memory=1 << 20)
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    got, want = (m.generate(PROMPTS, scored, use_tqdm=False) for m in (llm, reference))
    diffs = [abs(a[t].logprob - b[t].logprob) for g, w in zip(got, want)
             for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]) for t in a if t in b]
    assert 0 < sum(diffs) / len(diffs) < mean_diff, sum(diffs) / len(diffs)
