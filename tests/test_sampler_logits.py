"""The batched sampler's work on the logits around the draw: penalties, min_tokens and logit_bias
change them exactly as specified, logprobs and ranks come from the raw logits, and a row left with
nothing to sample fails alone."""

from __future__ import annotations

import math

import pytest
import torch
from test_sampler import CPU, EOS, sample, state

from services.worker.layers.sampler import (
    NO_TOKEN,
    Sampler,
    SamplingMetadata,
    apply_penalties,
    process_logits,
)
from shared.sampling_params import SamplingParams

# ----- penalties, min_tokens, logit_bias ------------------------------------------------------


def test_penalties_change_logits_exactly_as_specified() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    states = [state(params, prompt=[0, 1], output=[2, 2, 3]), state(SamplingParams(), prompt=[0], output=[1])]
    meta = SamplingMetadata.build(states, 6, CPU)
    got = apply_penalties(logits, meta.penalties)
    expected = torch.tensor(
        [
            # prompt tokens 0, 1: repetition only; output token 2 (twice), 3 (once): all three.
            [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25 * 2, -3.0 * 2 - 0.5 - 0.25, 1.0, 4.0],
            [1.0] * 6,  # a row without penalties is untouched
        ]
    )
    assert torch.allclose(got, expected)


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.zeros(1, 5)
    meta = SamplingMetadata.build(
        [state(SamplingParams(presence_penalty=1.0), prompt=[0, 1], output=[3])], 5, CPU
    )
    assert meta.penalties.prompt_mask is None  # no repetition penalty: no prompt mask built
    assert torch.equal(process_logits(logits, meta), torch.tensor([[0.0, 0.0, 0.0, -1.0, 0.0]]))


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(3, 8)
    logits[:, EOS] = 10.0
    logits[:, 4] = 9.0
    logits[:, 6] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    states = [state(params, output=[7]), state(params, output=[7, 7]), state(ignore, output=[])]
    meta = SamplingMetadata.build(states, 8, CPU)
    processed = process_logits(logits, meta)
    assert math.isinf(processed[0, EOS]) and math.isinf(processed[0, 4])
    assert processed[2, EOS] == 10.0 and math.isinf(processed[2, 4])  # ignore_eos: EOS not masked
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [6, EOS, EOS]


def test_logit_bias_is_added_before_sampling() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 0] = 5.0
    states = [
        state(SamplingParams(temperature=0.0, logit_bias={7: 6.0, 0: -1.0})),
        state(SamplingParams(temperature=0.0)),
    ]
    meta = SamplingMetadata.build(states, 10, CPU)
    processed = process_logits(logits, meta)
    assert processed[0, 7] == 6.0 and processed[0, 0] == 4.0 and torch.equal(processed[1], logits[1])
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [7, 0]
    # Bias on an unsampled row can force a token even with sampling.
    forced = state(SamplingParams(logit_bias={3: 100.0}))
    assert sample(torch.randn(1, 10), [forced]).sampled_token_ids.tolist() == [3]


# ----- logprobs -------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits_with_ranks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    states = [
        state(SamplingParams(logprobs=3, temperature=0.7, repetition_penalty=1.5), output=[2, 9]),
        state(SamplingParams(logprobs=0, temperature=0.0, logit_bias={5: 50.0})),
        state(SamplingParams(temperature=2.0, top_k=10)),
        state(SamplingParams(logprobs=1, seed=5)),
    ]
    out = sample(logits, states)
    raw = logits.log_softmax(-1)
    sampled = out.sampled_token_ids
    assert out.logprob_token_ids.shape == (4, 4) and out.logprobs.shape == (4, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, sampled[:, None]).squeeze(1))
    top = raw.topk(3, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    assert torch.allclose(out.logprobs[:, 1:], top.values)
    order = raw.argsort(dim=-1, descending=True)
    expected_ranks = (order == sampled[:, None]).int().argmax(-1) + 1
    assert torch.equal(out.sampled_ranks, expected_ranks)
    assert sampled[1] == 5 and out.sampled_ranks[1] == expected_ranks[1]  # biased pick, raw rank


def test_logprobs_zero_returns_only_the_sampled_token() -> None:
    logits = torch.randn(2, 12)
    out = sample(logits, [state(SamplingParams(logprobs=0, temperature=0.0))] * 2)
    assert out.logprobs.shape == (2, 1)
    assert torch.equal(out.sampled_ranks, torch.ones(2, dtype=torch.long))


# ----- rows with nothing to sample ------------------------------------------------------------


def test_min_tokens_leaves_the_stop_when_it_is_all_a_row_has() -> None:
    """A grammar that allows only EOS meets min_tokens: EOS stays (and ends the request) rather
    than the row being left with nothing; a row with other tokens still has EOS masked."""
    only_eos = torch.full((2, 20), float("-inf"))
    only_eos[0, EOS] = 0.0
    only_eos[1, EOS], only_eos[1, 7] = 5.0, 0.0
    states = [state(SamplingParams(temperature=t, min_tokens=4)) for t in (0.0, 1.0)]
    assert sample(only_eos, states).sampled_token_ids.tolist() == [EOS, 7]


@pytest.mark.parametrize("poison", [float("-inf"), float("nan"), float("inf")])
def test_a_row_with_no_usable_logit_samples_no_token_alone(poison: float) -> None:
    logits = torch.randn(3, 30)
    logits[1] = float("-inf")
    logits[1, 4] = poison  # all masked, or masked but for a NaN / +inf
    states = [state(SamplingParams(temperature=t, logprobs=1)) for t in (0.0, 0.7, 0.0)]
    out = sample(logits, states)
    assert out.sampled_token_ids[1] == NO_TOKEN
    assert out.sampled_token_ids[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
    assert out.logprobs.shape == (3, 2) and out.logprobs[[0, 2]].isfinite().all()
