"""The attention backend is chosen in the config tree (the environment variable is only the
default), and the backend interface is a leaf: the forward context does not import the layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.worker.layers.attention import select_backend
from shared.config import CompilationConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_environment_variable_is_the_config_default(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_ATTENTION_BACKEND", raising=False)
    assert CompilationConfig().attention_backend is None
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "triton")
    assert CompilationConfig().attention_backend == "triton"
    assert CompilationConfig(attention_backend="torch").attention_backend == "torch"  # the config wins


def test_an_unknown_backend_is_refused_when_the_config_is_built(monkeypatch):
    with pytest.raises(ValueError, match="attention backend must be one of"):
        CompilationConfig(attention_backend="flash")
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        CompilationConfig()


def test_select_backend_follows_the_config_name():
    cpu = torch.device("cpu")
    assert select_backend(cpu).name == "torch"  # the CPU default
    assert select_backend(cpu, name="torch").name == "torch"
    with pytest.raises(ValueError, match="must be one of"):
        select_backend(cpu, name="flash")


def test_the_forward_context_does_not_import_the_attention_layer():
    code = (
        "import sys, services.worker.forward_context, services.worker.layers.attention_backend;"
        "assert 'services.worker.layers.attention' not in sys.modules, 'import cycle'"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
