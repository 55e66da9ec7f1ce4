"""Kernel tests run natively on CUDA when present, otherwise in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (@triton.jit reads it when it
decorates a kernel), so it is set here at conftest import time, before the test modules are
collected.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_helpers import DEVICE


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
