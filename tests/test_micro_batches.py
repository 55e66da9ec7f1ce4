"""With pipeline stages the engine keeps one step in flight per stage, each a disjoint set of
requests (vLLM's virtual engines), and the greedy tokens are those of the plain schedule."""

from __future__ import annotations

import dataclasses

from pagedserve import LLM, SamplingParams
from services.engine.core import EngineCore
from services.worker.model_runner import ModelRunner
from shared.config import ParallelConfig

PROMPTS = [[11, 12, 13], [40, 41, 42, 43, 44], list(range(60, 90)), [5, 6], [70, 71, 72, 73]]
GREEDY = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)


def test_two_stages_keep_two_disjoint_steps_in_flight(model_dirs):
    llm = LLM(str(model_dirs("llama")), max_model_len=128, kv_cache_memory=4 << 20)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    expected = {str(i): list(o.outputs[0].token_ids) for i, o in enumerate(outs)}

    # the engine of a two-stage replica, over one rank that runs its plans in order
    config = dataclasses.replace(llm.config, parallel=ParallelConfig(pipeline_parallel_size=2))
    runner = ModelRunner(llm.config)
    core = EngineCore(config, runner, runner.num_blocks)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(core.make_request(str(i), prompt, GREEDY))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    overlapped = 0
    while core.has_unfinished():
        for delta in core.step():
            got[delta.req_id] += delta.new_token_ids
        assert len(core.in_flight) <= 1
        if core.last_result is not None and core.in_flight:
            # the step still in flight was submitted before the one just read had its result
            collected, pending = set(core.last_result.req_ids), set(core.in_flight[0].num_scheduled_tokens)
            assert not collected & pending, (collected, pending)
            overlapped += bool(collected and pending)
    assert overlapped >= 6  # the 5 requests alternate between two micro-batches, 7 tokens each
    assert got == expected
    assert core.scheduler.kv.pool.num_free_blocks == runner.num_blocks  # every block back in the pool
