"""Shared fixtures.

model_dirs (session scope): a callable `model_dirs(arch, size="tiny", **kwargs) -> Path` that
builds a seeded random-weight checkpoint with pagedserve.test_model.make_test_model (config,
safetensors weights, generation_config.json, byte-level BPE tokenizer with a ChatML template)
in a session temporary directory, once per distinct set of arguments, and returns its directory.
arch is one of pagedserve.test_model.ARCHS (llama, mistral, qwen2, qwen3, gemma, opt); kwargs are passed
on (seed, config_overrides, max_shard_size). Treat the directories as read-only: they are shared
by every test in the session.

    def test_something(model_dirs):
        path = model_dirs("qwen2")
"""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any test module can
# import a kernel, so kernels run in the CPU interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pagedserve.test_model import make_test_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    built: dict[str, Path] = {}

    def get(arch: str, size: str = "tiny", **kwargs) -> Path:
        key = json.dumps([arch, size, kwargs], sort_keys=True)
        if key not in built:
            built[key] = make_test_model(tmp_path_factory.mktemp(f"{arch}-{size}"), arch, size, **kwargs)
        return built[key]

    return get
