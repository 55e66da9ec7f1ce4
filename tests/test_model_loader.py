"""The weight loader and what comes with a checkpoint: a sharded checkpoint loads the same
weights, a bad one or an unknown architecture raises a clear error, the dtype resolves from the
flag and the checkpoint, and the test checkpoint's tokenizer covers the vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import load
from transformers import AutoTokenizer

from services.worker.loader import build_model, resolve_dtype
from services.worker.models import get_model_class
from shared.config import ModelConfig


def test_sharded_checkpoint_loads_the_same_weights(model_dirs):
    sharded = model_dirs("qwen2", max_shard_size="100KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    ours = build_model(ModelConfig.from_pretrained(str(sharded)), torch.float32, "cpu")
    reference, _, _ = load(model_dirs("qwen2"))
    expected = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param, expected[name]), name


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape", "integer", "bad_index", "outside_index"])
def test_bad_checkpoint_raises_a_clear_error(model_dirs, tmp_path, change):
    shutil.copytree(model_dirs("llama"), tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    if change == "missing":
        del weights[name]
    elif change == "unexpected":
        weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    elif change == "wrong_shape":
        weights[name] = weights[name][:-1].clone()
    elif change == "integer":  # e.g. a quantized checkpoint: never cast into garbage floats
        weights[name] = weights[name].to(torch.int8)
    index = {"bad_index": {"weights": {}}, "outside_index": {"weight_map": {name: "../model.safetensors"}}}
    if change in index:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index[change]))
    save_file(weights, tmp_path / "model.safetensors")
    message = {"missing": r"lacks .*qkv_proj\.weight \(shards \['k'\]\)", "unexpected": "mlp.extra.weight",
               "wrong_shape": "k_proj.weight.*shape mismatch", "integer": "k_proj.weight.*dtype torch.int8",
               "bad_index": "not a weights index", "outside_index": "outside the checkpoint"}[change]
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig.from_pretrained(str(tmp_path)), torch.float32, "cpu")


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_resolve_dtype(model_dirs):
    base = ModelConfig.from_pretrained(str(model_dirs("llama")))

    def config(dtype, checkpoint):
        return ModelConfig(**{**base.__dict__, "dtype": dtype, "checkpoint_dtype": checkpoint})

    assert resolve_dtype(config(None, "bfloat16"), "cpu") == torch.float32
    assert resolve_dtype(config(None, "bfloat16"), "cuda") == torch.bfloat16
    assert resolve_dtype(config("auto", "float16"), "cpu") == torch.float16
    assert resolve_dtype(config("bfloat16", "float32"), "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(config("auto", "int8"), "cpu")


def test_test_model_tokenizer_covers_the_vocabulary(model_dirs):
    path = model_dirs("qwen3")
    config = ModelConfig.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == config.vocab_size
    assert config.eos_token_ids == (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    assert all(isinstance(tok.decode([i]), str) for i in range(config.vocab_size))
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
