"""Checkpoints in PyTorch's format (pytorch_model.bin, sharded with pytorch_model.bin.index.json,
or in torch's pre-1.6 format) load the same weights as safetensors and generate the same tokens; safetensors win where a
checkpoint has both; a .bin that would run code to load, or holds anything but named tensors, is
refused with a clear error before anything runs; a hub checkpoint without safetensors fetches
its .bin files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pagedserve import LLM, SamplingParams
from services.worker.loader import build_model, checkpoint_files
from shared.checkpoint import resolve_model_path
from shared.config import ModelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 10 for j in range(5 + 4 * i)]} for i in range(3)]


def as_pytorch_bin(src: Path, out: Path, shards: int = 1) -> Path:
    """A copy of the safetensors checkpoint at src with its weights in pytorch_model*.bin files."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    weights = {}
    for file in checkpoint_files(src):
        weights.update(load_file(file))
    if shards == 1:
        torch.save(weights, out / "pytorch_model.bin")
        return out
    names, weight_map = sorted(weights), {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: weights[n] for n in part}, out / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def qwen2(model_dirs) -> Path:
    return model_dirs("qwen2")


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load_the_same_weights_and_tokens(qwen2, tmp_path, shards):
    pt = as_pytorch_bin(qwen2, tmp_path / "pt", shards)
    assert [f.suffix for f in checkpoint_files(pt)] == [".bin"] * shards
    ours = dict(build_model(ModelConfig.from_pretrained(str(pt)), torch.float32, "cpu").named_parameters())
    reference = build_model(ModelConfig.from_pretrained(str(qwen2)), torch.float32, "cpu")
    for name, param in reference.named_parameters():
        assert torch.equal(ours[name], param), name
    kwargs = {"max_model_len": 64, "kv_cache_memory": 8 << 20}
    want = LLM(str(qwen2), **kwargs).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = LLM(str(pt), **kwargs).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_a_pytorch_bin_in_torchs_legacy_format_loads(qwen2, tmp_path):
    """Files saved before torch 1.6's zip format are read rather than mapped."""
    legacy = as_pytorch_bin(qwen2, tmp_path / "legacy")
    torch.save(load_file(qwen2 / "model.safetensors"), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ours = dict(build_model(ModelConfig.from_pretrained(str(legacy)), torch.float32, "cpu").named_parameters())
    for name, param in build_model(ModelConfig.from_pretrained(str(qwen2)), torch.float32, "cpu").named_parameters():
        assert torch.equal(ours[name], param), name


def test_safetensors_win_over_pytorch_bin(qwen2, tmp_path):
    both = as_pytorch_bin(qwen2, tmp_path / "both")
    shutil.copy(qwen2 / "model.safetensors", both / "model.safetensors")
    assert checkpoint_files(both) == [both / "model.safetensors"]


class _RunsCode:
    """Unpickling this calls os.system: a weights file must never do so."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["runs_code", "not_tensors", "garbage"])
def test_a_pytorch_bin_that_is_not_plain_tensors_is_refused(qwen2, tmp_path, content):
    bad = as_pytorch_bin(qwen2, tmp_path / "bad")
    marker = tmp_path / "ran"
    file = bad / "pytorch_model.bin"
    if content == "runs_code":
        torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, file, pickle_module=pickle)
    elif content == "not_tensors":
        torch.save({"model.embed_tokens.weight": [1.0, 2.0]}, file)
    else:
        file.write_bytes(b"not a weights file")
    message = {"runs_code": "loads without running code", "not_tensors": "a dict of named tensors",
               "garbage": "loads without running code"}[content]
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig.from_pretrained(str(bad)), torch.float32, "cpu")
    assert not marker.exists()


def test_a_hub_checkpoint_without_safetensors_fetches_its_bin_files(monkeypatch, tmp_path):
    """The hub is out of reach here: snapshot_download is replaced by a copy, from a local
    'repository', of the files its patterns select, as huggingface_hub would download them."""
    import fnmatch

    import huggingface_hub

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("config.json", "pytorch_model.bin", "training_args.bin"):
        (repo / name).write_text("{}")
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        calls.append(list(allow_patterns))
        local = tmp_path / "cache"
        local.mkdir(exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, local / file.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = resolve_model_path("org/eagle-head")
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert len(calls) == 2 and "*.safetensors" in calls[0] and "pytorch_model*.bin" in calls[1]
    calls.clear()
    resolve_model_path("org/eagle-head", weights=False)  # the engine's config-only fetch
    assert len(calls) == 1 and not any("bin" in p or "safetensors" in p for p in calls[0])
