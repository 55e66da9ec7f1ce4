"""The batched sampler: what a user of the API would notice about the tokens it picks, greedy,
seeded and truncated (top-k, top-p, min-p). The logits work around the draw (penalties, min_tokens,
logit_bias, logprobs, rows with nothing to sample) is in test_sampler_logits.py."""

from __future__ import annotations

import pytest
import torch

from services.worker.layers.sampler import Sampler, SamplingMetadata, SamplingState
from shared.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 1


def state(
    params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None
) -> SamplingState:
    return SamplingState.create(params, prompt or [5, 6], (EOS,), output)


def sample(logits: torch.Tensor, states: list[SamplingState]):
    meta = SamplingMetadata.build(states, logits.shape[-1], CPU)
    return Sampler()(logits, meta)


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


# ----- greedy ---------------------------------------------------------------------------------


def test_greedy_takes_argmax_and_builds_no_random_tensors() -> None:
    logits = torch.randn(6, 50)
    states = [state(SamplingParams(temperature=0.0, top_k=5, top_p=0.5)) for _ in range(6)]
    meta = SamplingMetadata.build(states, 50, CPU)
    assert meta.all_greedy and meta.temperature is None and meta.top_k is None and meta.top_p is None
    assert meta.penalties is None and meta.logit_bias is None and meta.max_num_logprobs is None
    out = Sampler()(logits, meta)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_greedy_rows_in_a_mixed_batch_take_argmax() -> None:
    logits = torch.randn(8, 40)
    states = [state(SamplingParams(temperature=0.0 if i % 2 else 1.5)) for i in range(8)]
    out = sample(logits, states)
    assert torch.equal(out.sampled_token_ids[1::2], logits[1::2].argmax(-1))


def test_callers_logits_are_not_modified() -> None:
    logits = torch.randn(2, 30)
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_k=3, repetition_penalty=1.3, logit_bias={2: 4.0}, logprobs=2)
    sample(logits, [state(params, output=[4]), state(SamplingParams(min_tokens=3, top_p=0.5))])
    assert torch.equal(logits, before)


# ----- seeded requests ------------------------------------------------------------------------


def _run_steps(seed: int, logits_per_step: list[torch.Tensor], companions: int, position: int) -> list[int]:
    """Sample a seeded request for several steps inside batches of ``companions`` other rows."""
    target = state(SamplingParams(seed=seed, temperature=0.9, top_k=30, top_p=0.95))
    others = [
        state(SamplingParams(seed=1000 + i if i % 2 else None, temperature=1.2)) for i in range(companions)
    ]
    tokens = []
    for step, row in enumerate(logits_per_step):
        batch = others[:]
        pos = (position + step) % (len(batch) + 1)  # a different position every step
        batch.insert(pos, target)
        logits = torch.randn(len(batch), row.shape[0])
        logits[pos] = row
        token = int(sample(logits, batch).sampled_token_ids[pos])
        target.append(token)
        tokens.append(token)
        for other in others:
            other.append(0)
    return tokens


def test_seeded_request_is_reproducible_whatever_the_batch() -> None:
    steps = [torch.randn(64) for _ in range(6)]
    alone = _run_steps(42, steps, companions=0, position=0)
    torch.manual_seed(123)  # unseeded companions must not matter either
    crowded = _run_steps(42, steps, companions=5, position=3)
    other_crowd = _run_steps(42, steps, companions=2, position=1)
    assert alone == crowded == other_crowd
    # Different seeds give different streams (64 tokens over 6 steps: equal by chance is negligible).
    assert any(_run_steps(s, steps, 0, 0) != alone for s in (1, 2, 3))


def test_a_seeded_token_depends_only_on_seed_and_output_position() -> None:
    """A request rebuilt with its first k tokens (preempted, or recomputed after a restart)
    draws what the undisturbed one drew from token k on."""
    steps = [torch.randn(64) for _ in range(8)]
    undisturbed = _run_steps(42, steps, companions=3, position=2)
    for k in (1, 5):
        resumed = state(SamplingParams(seed=42, temperature=0.9, top_k=30, top_p=0.95), output=undisturbed[:k])
        torch.manual_seed(k)  # the global RNG differs too
        for step, row in enumerate(steps[k:], start=k):
            token = int(sample(row.unsqueeze(0), [resumed]).sampled_token_ids[0])
            assert token == undisturbed[step], (k, step)
            resumed.append(token)


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63, 2**64 - 1])
def test_every_seed_the_api_accepts_samples_reproducibly(seed: int) -> None:
    logits = torch.zeros(1, 1000)
    draws = [int(sample(logits, [state(SamplingParams(seed=seed), output=[3] * 4)]).sampled_token_ids[0]) for _ in "ab"]
    assert draws[0] == draws[1]


def test_parallel_children_draw_distinct_streams() -> None:
    """The n > 1 children (seed + i) do not repeat one another, nor each other shifted by a token."""
    parent = SamplingParams(seed=7, n=3, temperature=1.0)
    children = [parent.for_child(i) for i in range(3)]
    flat = torch.zeros(1, 1000)  # uniform: the token is the noise's own argmax
    streams = []
    for child in children:
        row = state(child)
        for _ in range(6):
            row.append(int(sample(flat, [row]).sampled_token_ids[0]))
        streams.append(row.output_token_ids)
    assert len({tuple(s) for s in streams}) == 3
    assert streams[0][1:] != streams[1][:-1] and streams[1][1:] != streams[0][:-1]


def test_unseeded_rows_follow_the_global_rng() -> None:
    flat = torch.zeros(4, 1000)
    rows = [state(SamplingParams(temperature=1.0)) for _ in range(4)]
    torch.manual_seed(5)
    first = sample(flat, rows).sampled_token_ids.tolist()
    torch.manual_seed(5)
    assert sample(flat, rows).sampled_token_ids.tolist() == first
    assert sample(flat, rows).sampled_token_ids.tolist() != first  # the global stream moved on


# ----- truncation never leaks disallowed tokens -----------------------------------------------


def _draw(logits_row: torch.Tensor, params: SamplingParams, draws: int = 3000) -> set[int]:
    logits = logits_row.expand(draws, -1).contiguous()
    return set(sample(logits, [state(params) for _ in range(draws)]).sampled_token_ids.tolist())


def test_top_k_stays_in_the_top_k() -> None:
    row = torch.randn(100)
    allowed = set(row.topk(5).indices.tolist())
    seen = _draw(row, SamplingParams(top_k=5, temperature=3.0))
    assert seen == allowed  # never outside, and with a hot temperature all of them show up


@pytest.mark.parametrize("top_p, allowed", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.01, {0})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, allowed: set[int]) -> None:
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert _draw(row, SamplingParams(top_p=top_p)) == allowed


@pytest.mark.parametrize("min_p, allowed", [(0.2, {0, 1, 2}), (0.7, {0}), (0.0, {0, 1, 2, 3})])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p: float, allowed: set[int]) -> None:
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert _draw(row, SamplingParams(min_p=min_p)) == allowed


def test_top_k_and_top_p_combine_per_row() -> None:
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    logits = row.expand(3000, -1).contiguous()
    # top_k=3 renormalizes to (4/9, 3/9, 2/9): top_p=0.7 then needs tokens {0, 1}.
    specs = [SamplingParams(top_k=3, top_p=0.7), SamplingParams(top_k=2), SamplingParams(top_p=0.5)]
    states = [state(specs[i % 3]) for i in range(3000)]
    out = sample(logits, states).sampled_token_ids
    assert set(out[0::3].tolist()) == {0, 1}
    assert set(out[1::3].tolist()) == {0, 1}
    assert set(out[2::3].tolist()) == {0, 1}


def test_sampling_frequencies_follow_the_tempered_distribution() -> None:
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 40000
    out = sample(row.expand(draws, -1).contiguous(), [state(SamplingParams(temperature=0.5))] * draws)
    freq = torch.bincount(out.sampled_token_ids, minlength=4).float() / draws
    assert torch.allclose(freq, (row / 0.5).softmax(-1), atol=0.01)
