"""Async scheduling over the real model runner, in one process: every kind of request ends with
the tokens, logprobs and finish reasons of the synchronous schedule, also when a tiny KV pool
preempts requests, and every block returns to the pool."""

from __future__ import annotations

import dataclasses

import pytest
from engine_outputs import assert_same_outputs, collect_outputs

from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams, StructuredOutputsParams

PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, max_tokens=20, logprobs=3, stop_token_ids=list(range(0, 500, 9))),
    "seeded": SamplingParams(temperature=1.0, seed=7, max_tokens=20, presence_penalty=0.5, ignore_eos=True),
    "prompt_logprobs": SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True),
    "choice": SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])
    ),
    "min_tokens": SamplingParams(temperature=0, max_tokens=16, min_tokens=5, stop_token_ids=list(range(0, 500, 3))),
}


@pytest.fixture(scope="module")
def runner(model_dirs):
    from services.worker.model_runner import ModelRunner

    model = ModelConfig.from_pretrained(str(model_dirs("llama")), max_model_len=128)
    return ModelRunner(EngineConfig(model, CacheConfig(kv_cache_memory=8 << 20)))


def generate(runner, async_scheduling: bool, num_blocks: int) -> tuple[dict, EngineCore]:
    runner.reset()
    config = dataclasses.replace(
        runner.config, scheduler=SchedulerConfig(max_num_batched_tokens=64, async_scheduling=async_scheduling)
    )
    engine = EngineCore(config, runner, num_blocks)
    for i, (name, params) in enumerate(PARAMS.items()):
        for j in range(2):
            prompt = [(k * 31 + 17 * i + 5 * j) % 400 + 3 for k in range(9 + 7 * i + j)]
            engine.add_request(engine.make_request(f"{name}-{j}", prompt, params))
    out = collect_outputs(engine)
    pool = engine.scheduler.kv.pool
    assert pool.num_free_blocks == num_blocks and not engine.in_flight and not engine.scheduler.placeholders
    return out, engine


@pytest.mark.parametrize("num_blocks", [64, 12], ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_synchronous_output(runner, num_blocks):
    sync, _ = generate(runner, False, num_blocks)
    asyn, engine = generate(runner, True, num_blocks)
    assert_same_outputs(asyn, sync)
    assert all(o["finish"][0] in ("stop", "length") for o in asyn.values())
    assert len(asyn["prompt_logprobs-0"]["prompt"]) == 9 + 7 * 3 - 1  # every prompt token after the first
    assert {o["finish"][0] for r, o in asyn.items() if r.startswith("choice")} == {"stop"}
    if num_blocks == 12:
        assert engine.scheduler.num_preemptions > 0
