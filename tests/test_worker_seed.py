"""Seeded sampling through the offline engine and the real model runner: a seeded request's tokens
are the same undisturbed, preempted, recomputed on a worker that lost its state, and resubmitted
with its first k tokens as a resumption."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pagedserve import LLM, SamplingParams
from services.engine.core import EngineCore
from services.engine.request import Request

MAX_TOKENS = 16
SEEDED = SamplingParams(temperature=1.0, seed=2024, max_tokens=MAX_TOKENS, ignore_eos=True)
OTHER = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# 5 blocks of 8 tokens: one request fits alone (max_model_len 40); three together preempt.
SMALL_CACHE = {"num_gpu_blocks_override": 5, "max_model_len": 40, "block_size": 8}


@pytest.fixture(scope="module")
def llm(model_dirs) -> LLM:
    return LLM(str(model_dirs("llama")), **SMALL_CACHE)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    rng = random.Random(11)
    vocab = llm.config.model.vocab_size
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in (9, 12, 15)]


@pytest.fixture(scope="module")
def undisturbed(llm: LLM, prompts: list[list[int]]) -> list[int]:
    out = llm.generate({"prompt_token_ids": prompts[0]}, SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == MAX_TOKENS
    return out


def drive(core: EngineCore, requests: list[Request], hook: Callable[[int], None] = lambda step: None):
    """Step the core until every request ends; hook(step) runs before each step. Returns the
    tokens each request received."""
    for request in requests:
        core.add_request(request)
    tokens: dict[str, list[int]] = {r.req_id: [] for r in requests}
    step = 0
    while core.has_unfinished():
        hook(step)
        for delta in core.step():
            assert delta.finish_reason in (None, "length"), delta
            tokens[delta.req_id] += delta.new_token_ids
        step += 1
    assert core.scheduler.kv.pool.num_free_blocks == core.scheduler.kv.pool.num_blocks  # every block back
    return tokens


def test_a_preempted_seeded_request_draws_its_undisturbed_tokens(llm, prompts, undisturbed):
    core = llm.engine
    # the newest request is the one preempted (FCFS): the seeded one comes last
    requests = [core.make_request(f"other-{i}", p, OTHER) for i, p in enumerate(prompts[1:])]
    seeded = core.make_request("seeded", prompts[0], SEEDED)
    tokens = drive(core, requests + [seeded])
    assert seeded.num_preemptions > 0
    assert tokens["seeded"] == undisturbed


def test_a_seeded_request_recomputed_on_a_fresh_worker_continues_identically(llm, prompts, undisturbed):
    core, runner = llm.engine, llm.runner
    seeded = core.make_request("restarted", prompts[0], SEEDED)

    def restart_worker(step: int) -> None:
        if step == 6:  # the runner forgets every request, as a new worker process would
            runner.reset()
            core.restart_workers(runner.num_blocks)

    tokens = drive(core, [seeded], restart_worker)
    assert seeded.num_preemptions == 1
    assert tokens["restarted"] == undisturbed


@pytest.mark.parametrize("k", [1, 7, MAX_TOKENS - 1])
def test_a_resumption_with_k_tokens_continues_the_undisturbed_run(llm, prompts, undisturbed, k):
    core = llm.engine
    resumed = core.make_request(f"resumed-{k}", prompts[0], SEEDED, output_token_ids=undisturbed[:k])
    other = core.make_request(f"beside-{k}", prompts[1], OTHER)  # batched with an unseeded request
    tokens = drive(core, [resumed, other])
    assert undisturbed[:k] + tokens[f"resumed-{k}"] == undisturbed


def test_children_of_a_seeded_request_differ_and_reproduce(llm, prompts):
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=8, ignore_eos=True)
    runs = [
        [c.token_ids for c in llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0].outputs]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 3
