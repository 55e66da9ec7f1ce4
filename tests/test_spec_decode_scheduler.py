"""Speculative decoding without a model: the ngram proposer, the speculative config's checks, the
scheduler's verification results (stops, rollback of rejected tokens), the adaptive number of
proposals (acceptance, batch size, pipeline stages, the CPU step's size), and the worker's checks
of a plan's proposals."""

from __future__ import annotations

import pytest
from test_spec_decode import SPEC

from services.engine.request import Request
from services.engine.scheduler import Scheduler
from services.engine.spec_decode import COMPUTE_BOUND_BATCH, STEP_TOKENS, SpecDecoder
from shared.config import CacheConfig, SchedulerConfig
from shared.proposers.ngram import NgramProposer
from shared.protocol import StepResult
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig


def test_ngram_proposer_finds_the_latest_match_and_follows_loops():
    p = NgramProposer(1, 3)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # latest match of [1, 2, 3]
    assert p.propose([7, 8, 7, 8], 5) == [7, 8, 7, 8, 7]  # a loop continues with its period
    assert p.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert p.propose([5, 5], 3) == [5, 5, 5]
    assert NgramProposer(2, 2).propose([1, 2, 9, 2], 3) == []  # a 1-gram match is below the minimum


def test_speculative_config_is_checked_like_vllms():
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}').num_speculative_tokens == 5
    assert SpeculativeConfig.parse({"method": "ngram", "prompt_lookup_max": 4}).lookup_range == (4, 4)
    for bad, match in (
        ({"method": "medusa"}, "method must be one of"),
        ({"num_speculative_tokens": 3}, "needs a \"method\""),
        ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "must not exceed"),
        ({"method": "ngram", "speculative_token_tree": "[(0,)]"}, "unsupported key"),
        ("[1]", "JSON object"),
        ("{", "JSON object"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)


@pytest.mark.parametrize(("params", "proposed", "got", "kept", "finish"), [
    (SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[7]), [6, 7, 8, 5], [6, 7, 8, 5, 6], [6, 7], "stop"),
    (SamplingParams(temperature=0, max_tokens=50, min_tokens=5, stop_token_ids=[7]), [6, 7, 8, 5], [6, 7, 9], [6, 7, 9],
     None),
    (SamplingParams(temperature=0, max_tokens=3), [6], [6, 7], [6, 7], "length"),
], ids=["stop-id-inside-the-run", "min-tokens", "max-tokens"])
def test_verification_results_end_at_a_stop_and_roll_back_rejected_tokens(params, proposed, got, kept, finish):
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 16, speculative=SPEC)
    scheduler.add_request(Request("r", [5, 6, 7, 8] * 3, params, (0,), 64))
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult(plan.step_id, ["r"], [5]))  # the prompt's step samples 5
    plan = scheduler.schedule()
    assert plan.spec_token_ids["r"].tolist() == proposed  # what followed the latest [..., 8, 5]
    assert plan.num_scheduled_tokens["r"] == 1 + len(proposed)
    (delta,) = scheduler.update(plan, StepResult(plan.step_id, ["r"] * len(got), got, num_proposed={"r": len(proposed)}))
    assert delta.new_token_ids == kept and delta.finish_reason == finish
    if finish is not None:
        assert scheduler.kv.pool.num_free_blocks == 16
        return
    request = scheduler.requests["r"]  # 2 of 4 accepted: the rest's KV is void, its block freed
    assert request.num_computed_tokens == request.num_tokens - 1 == 15
    assert len(scheduler.kv.block_ids("r")) == 4 and scheduler.kv.pool.num_free_blocks == 12
    nxt = scheduler.schedule()  # the worker is told to keep 4 blocks
    assert nxt.cached_requests[0].num_kept_blocks == 4 and nxt.cached_requests[0].num_computed_tokens == 15
    assert scheduler.spec.num_draft_tokens == 4 and scheduler.spec.num_accepted_tokens == 2


def test_proposals_adapt_to_acceptance_and_turn_off_in_a_large_batch():
    decoder = SpecDecoder(SpeculativeConfig(num_speculative_tokens=5))
    looping = Request("r", [7, 8] * 20, SamplingParams(max_tokens=100), (0,), 512)
    # no measurement yet (alpha 1/2): at a sixteenth of the compute-bound batch a proposal costs
    # 1/16 of a step, and 1/2 ** 4 of one holds
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 16)) == 4
    # half the proposals expected to hold, against a quarter of a step's cost each
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 4)) == 2
    assert decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH) == []
    for _ in range(6):
        decoder.record(looping, 5, 5)
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 2)) == 5  # they keep being accepted
    for _ in range(20):
        decoder.record(looping, 5, 0)
    # they keep failing (alpha ~0.17): none at a quarter of the batch, one at a sixteenth
    assert decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 4) == []
    assert len(decoder.propose(looping, 64, num_running=COMPUTE_BOUND_BATCH // 16)) == 1


def test_over_pipeline_stages_the_adaptive_rule_counts_one_steps_share():
    """With two micro batches in flight a step computes half the running requests: as many as the
    compute-bound batch are a step of half of it, where a proposal still pays (1/2 ** 1 >= 1/2);
    without, the step is compute-bound and none is made."""
    for micro_batches, proposals in ((1, 0), (2, 1)):
        s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 1024, speculative=SPEC, micro_batches=micro_batches)
        for i in range(COMPUTE_BOUND_BATCH):
            s.add_request(Request(f"r{i}", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
        first, *_ = (s.schedule() for _ in range(micro_batches))  # the prompts, a micro batch's share per step
        ids = list(first.num_scheduled_tokens)
        s.update(first, StepResult(first.step_id, ids, [5] * len(ids)))
        plan = s.schedule()
        assert len(s.running) == COMPUTE_BOUND_BATCH and len(plan.cached_requests) == len(ids)
        assert [len(plan.spec_token_ids.get(r, ())) for r in ids] == [proposals] * len(ids)


def test_proposals_leave_a_step_within_the_one_call_cpu_steps_size():
    """Requests whose proposals keep being accepted propose until the step holds STEP_TOKENS
    tokens (decodes first): past it a CPU step would leave its one C call."""
    n = COMPUTE_BOUND_BATCH // 2
    s = Scheduler(SchedulerConfig(max_num_seqs=n), CacheConfig(block_size=4), 2048, speculative=SPEC)
    for i in range(n):
        s.add_request(Request(f"r{i}", [5, 6, 7, 8] * 3, SamplingParams(temperature=0, max_tokens=50), (0,), 64))
    first = s.schedule()
    ids = list(first.num_scheduled_tokens)
    s.update(first, StepResult(first.step_id, ids, [5] * n))
    for r in s.running:
        r.spec_acceptance = (50.0, 50.0)  # every earlier proposal accepted
    plan = s.schedule()
    proposed = [len(plan.spec_token_ids.get(r, ())) for r in ids]
    assert sum(plan.num_scheduled_tokens.values()) == n + sum(proposed) == STEP_TOKENS
    assert proposed[0] == SPEC.num_speculative_tokens and proposed[-1] == 0  # the first scheduled took the room


def test_bad_proposals_in_a_plan_fail_their_request_alone():
    import numpy as np

    from services.worker.request_checks import WorkerLimits
    from services.worker.request_table import RequestTable
    from shared.protocol import NewRequestData, StepPlan

    table = RequestTable(WorkerLimits(vocab_size=100, num_blocks=8, block_size=4, max_model_len=64))
    ids = np.array([1, 2, 3], dtype=np.int32)
    for r in ("ok", "out-of-vocab", "mid-prompt"):
        computed = 0 if r == "mid-prompt" else 2
        table.apply(StepPlan(0, [NewRequestData(r, ids, ids[:0], SamplingParams(), [0], [0, 1], computed)], [], {}, []))
    proposals = {"ok": [4, 5], "out-of-vocab": [4, 100], "mid-prompt": [4]}
    plan = StepPlan(1, [], [], {r: 1 + len(p) for r, p in proposals.items()}, [],
                    {r: np.array(p, dtype=np.int32) for r, p in proposals.items()})
    assert [s.req_id for s, _ in table.runnable(plan)] == ["ok"]
    assert "token ids in [0, 100)" in table.failed["out-of-vocab"]
    assert "must follow the last token" in table.failed["mid-prompt"]
    with pytest.raises(ValueError, match="needs its tokens and one more scheduled"):
        StepPlan(2, [], [], {"ok": 2}, [], {"ok": np.array([4, 5], dtype=np.int32)})
