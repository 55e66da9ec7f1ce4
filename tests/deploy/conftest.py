"""Fixtures for the tests that run the compose stack as local processes (local_stack.py): the
stack, one per module, and the name of the model it serves."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from local_stack import NGINX, LocalStack, running_stack


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory) -> Iterator[LocalStack]:
    if NGINX is None:
        pytest.skip("nginx not found: apt-get install -y nginx (.ci/run does)")
    logs = tmp_path_factory.mktemp("stack")
    with running_stack(model_dirs("llama"), logs) as st:
        yield st


@pytest.fixture(scope="module")
def model_name(stack: LocalStack) -> str:
    return httpx.get(f"{stack.base}/v1/models", timeout=30).json()["data"][0]["id"]
