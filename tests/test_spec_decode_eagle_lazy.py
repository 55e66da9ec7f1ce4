"""When an EAGLE head runs: only for a request the plan asks drafts of, over every position it
kept since it last ran (its KV then follows the target's), or for all requests at once when what
they kept would pass the step's token budget. Over the real model runner and engine core, with
the "mimic" head (it computes the target's layer one position later, so most drafts hold while
its KV is right) on the one-layer target of test_spec_decode_eagle.py."""

from __future__ import annotations

import dataclasses

import pytest
import test_spec_decode_eagle as base
from engine_outputs import collect_outputs

from services.engine.core import EngineCore
from services.engine.spec_decode import COMPUTE_BOUND_BATCH
from shared.config import SchedulerConfig
from shared.sampling_params import SamplingParams

heads, unit_norm, target = base.heads, base.unit_norm, base.target  # the fixtures
make_runner, eagle_spec = base.make_runner, base.eagle_spec


@pytest.mark.parametrize("budget", [2048, 200])  # 200: the shorts' prompts fit one step
def test_a_request_that_drafts_after_a_gap_catches_the_head_up(unit_norm, heads, budget):
    """A request drafts alone, stops while COMPUTE_BOUND_BATCH more requests run (the step is
    compute-bound: no drafts), then drafts again. With room in the budget the head runs no forward
    in the gap; with a small one it runs over what the requests kept, in forwards of at most twice
    the budget. Either way its KV is right after the gap: most drafts still hold."""
    target, _ = unit_norm
    spec = eagle_spec(heads("eagle", "mimic", target))
    scheduler = SchedulerConfig(max_num_seqs=2 * COMPUTE_BOUND_BATCH, max_num_batched_tokens=budget)
    runner = make_runner(target, spec, scheduler=scheduler)
    runner.reset()
    sizes, forward = [], runner.draft._forward

    def counted(rows, spans, hidden=None):
        sizes.append(sum(hi - lo for lo, hi in spans))
        return forward(rows, spans, hidden)

    runner.draft._forward = counted
    engine = EngineCore(runner.config, runner, 256)
    counts = engine.scheduler.spec
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    engine.add_request(engine.make_request("long", [17, 256, 3, 98, 5] * 2, params))
    while counts.num_accepted_tokens < 8:
        engine.step()
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(COMPUTE_BOUND_BATCH):
        engine.add_request(engine.make_request(f"short-{i}", [i + 3, 40, 7 * i + 9], short))
    engine.step()
    ran, drafted, accepted = len(sizes), counts.num_draft_tokens, counts.num_accepted_tokens
    gap_start = len(runner.table.states["long"].token_ids)
    while engine.scheduler.num_running > 1:
        assert engine.scheduler.requests["long"].draft_token_ids == []
        engine.step()
    gap = len(runner.table.states["long"].token_ids) - gap_start
    assert gap >= 3 and counts.num_draft_tokens == drafted
    if budget == 2048:
        assert len(sizes) == ran  # nothing drafted, nothing run
    else:
        assert len(sizes) > ran and max(sizes[ran:]) <= 2 * budget
    collect_outputs(engine)
    assert counts.num_draft_tokens > drafted + 8  # it drafted again
    assert counts.num_accepted_tokens - accepted > 0.5 * (counts.num_draft_tokens - drafted)
    engine.add_request(engine.make_request("after", [5, 6, 7], short))
    collect_outputs(engine)  # its plans list the earlier requests as finished
    assert set(runner.draft.kept) <= {"after"}  # nothing kept for requests that left


def test_a_head_that_never_drafts_never_runs(unit_norm, heads):
    """With the rule's drafting cost too high to ever pay, the head runs no forward at all and
    the outputs are plain decoding's."""
    target, want = unit_norm
    spec = dataclasses.replace(eagle_spec(heads("eagle", "mimic", target)), draft_cost=1.0)
    runner = make_runner(target, spec)
    out, engine = base.generate(runner, spec, *base.SETUPS["roomy"])
    base.assert_same_outputs(out, want)
    assert engine.scheduler.spec.num_drafts == 0 and runner.draft.num_forwards == 0
