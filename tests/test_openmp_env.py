"""Processes that import pagedserve before torch run torch's OpenMP threads passive (they sleep
between parallel regions instead of spinning against the C kernels' threads), unless the user
chose a wait policy; a process that loaded torch first keeps OpenMP's default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os{first}; import pagedserve; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(("first", "env", "want"), [
    ("", None, "PASSIVE"),
    ("", "ACTIVE", "ACTIVE"),
    ("; import torch", None, "None"),
])
def test_wait_policy_is_passive_unless_chosen(first, env, want):
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env is not None:
        environ["OMP_WAIT_POLICY"] = env
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=environ, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == want
