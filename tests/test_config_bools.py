"""A bool setting takes True or False only: LLM's bool keywords refuse a truthy "yes", 2 or
2**64 (and None) with a ValueError before anything loads, and a service whose PAGEDSERVE_*
switch is neither on nor off refuses to start, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedserve import LLM
from shared.config import CacheConfig, CompilationConfig, SchedulerConfig

KEYWORDS = ("async_scheduling", "enable_prefix_caching", "enforce_eager", "enable_lora")


@pytest.mark.parametrize("keyword", KEYWORDS)
@pytest.mark.parametrize("value", ["yes", 2, 2**64, None])
def test_llm_bool_keywords_refuse_other_values(model_dirs, keyword, value):
    with pytest.raises(ValueError, match=f"{keyword} must be True or False, got {value!r}"):
        LLM(str(model_dirs("llama")), **{keyword: value})


def test_config_classes_check_their_bools():
    assert SchedulerConfig(async_scheduling=True).async_scheduling is True
    for make in (lambda v: CacheConfig(enable_prefix_caching=v), lambda v: CompilationConfig(enforce_eager=v),
                 lambda v: SchedulerConfig(async_scheduling=v)):
        make(False)
        with pytest.raises(ValueError, match="must be True or False"):
            make(1)


def test_a_service_refuses_a_switch_variable_that_is_neither_on_nor_off(model_dirs):
    env = {**os.environ, "PAGEDSERVE_ASYNC_SCHEDULING": "maybe", "PAGEDSERVE_MODEL": str(model_dirs("llama"))}
    done = subprocess.run([sys.executable, "-m", "pagedserve.cli", "engine"], check=False, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "PAGEDSERVE_ASYNC_SCHEDULING must be 1/0, true/false, yes/no or on/off, got 'maybe'" in done.stderr
