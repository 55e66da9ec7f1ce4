"""Batched token sampling over one step's logits [B, V].

Order of operations (as vLLM's): logprobs from the raw logits; then allowed_token_ids and
bad_words masking, logit_bias, min_tokens masking and penalties; greedy rows take the argmax of
those processed logits; other rows are divided by their temperature, filtered by min_p, top_k and
top_p, and sampled by inverse CDF.
Rows with a seed draw their noise from a generator seeded for that row and output position
(sampling_metadata.noise_seed), so a seeded request gets the same tokens whatever else shares the
batch and however often it was preempted or recomputed.

A row left with no usable logit (every token masked, or a NaN / +inf from its penalties or bias)
samples no token: its id is NO_TOKEN, and the caller fails that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.layers.sampling_metadata import PenaltyTensors, SamplingMetadata, SamplingState

NO_TOKEN = -1  # sampled_token_ids of a row with nothing it may sample

__all__ = [
    "NO_TOKEN",
    "PenaltyTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingState",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_top_p",
    "process_logits",
    "random_probs",
    "random_sample",
]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] long, NO_TOKEN on rows with no usable logit
    # Column 0 is the sampled token, columns 1..k the top-k of the raw distribution, where k is the
    # most any row asked for (callers trim rows that asked fewer). None when no row asked.
    logprob_token_ids: torch.Tensor | None  # [B, k + 1] long
    logprobs: torch.Tensor | None  # [B, k + 1] float
    sampled_ranks: torch.Tensor | None  # [B] long, 1-based rank of the sampled token


class Sampler:
    """Stateless; per-request state lives in ``SamplingState`` and per-step tensors in
    ``SamplingMetadata``."""

    def __call__(
        self, logits: torch.Tensor, meta: SamplingMetadata, chosen: torch.Tensor | None = None
    ) -> SamplerOutput:
        """chosen: [B] long, a token already chosen for a row (speculative decoding's rejection
        sampling), -1 where the row samples as usual; its logprobs are the chosen token's."""
        logits = logits.to(torch.float32)
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = process_logits(logits, meta)
        # One pass for the greedy choice and the check: a row's max is -inf when every token is
        # masked, NaN or +inf when a NaN or +inf would poison the softmax.
        best, greedy_ids = logits.max(dim=-1)
        unusable = ~best.isfinite()
        if meta.all_greedy:
            sampled = greedy_ids
        else:
            sampled = _sample_random(logits, meta)
            if not meta.all_random:
                sampled = torch.where(meta.greedy_mask, greedy_ids, sampled)
        if chosen is not None:
            sampled = torch.where(chosen >= 0, chosen, sampled)
        if raw_logprobs is None:
            out = SamplerOutput(sampled, None, None, None)
        else:
            out = _gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        out.sampled_token_ids = sampled.masked_fill(unusable, NO_TOKEN)
        return out


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """allowed_token_ids and bad_words masking, logit_bias, then min_tokens masking, then
    penalties. Returns a new tensor when anything applies (the caller's logits are never
    modified), else ``logits`` itself."""
    if meta.disallowed is None and meta.bad_words is None and meta.logit_bias is None \
            and meta.min_tokens_mask is None and meta.penalties is None:
        return logits
    logits = logits.clone()
    if meta.disallowed is not None:
        rows, mask = meta.disallowed
        logits[rows] = logits[rows].masked_fill(mask, float("-inf"))
    if meta.bad_words is not None:
        rows, cols = meta.bad_words
        logits.index_put_((rows, cols), torch.tensor(float("-inf"), device=logits.device))
    if meta.logit_bias is not None:
        rows, cols, values = meta.logit_bias
        logits.index_put_((rows, cols), values, accumulate=True)
    if meta.min_tokens_mask is not None:
        _mask_min_tokens(logits, *meta.min_tokens_mask)
    if meta.penalties is not None:
        logits = apply_penalties(logits, meta.penalties)
    return logits


def _mask_min_tokens(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Forbid, in place, each row's stop tokens before its min_tokens, except on a row where they
    are all that is left (a structured-outputs grammar that allows only a stop): there the stop
    stays and ends the request, as in vLLM, rather than leaving nothing to sample."""
    before = logits[rows, cols]
    neg_inf = torch.full_like(before, float("-inf"))
    logits.index_put_((rows, cols), neg_inf)
    emptied = logits.amax(dim=-1) == float("-inf")
    logits.index_put_((rows, cols), torch.where(emptied[rows], before, neg_inf))


def apply_penalties(logits: torch.Tensor, p: PenaltyTensors) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (positive logits divided by it, negative
    ones multiplied), then presence and frequency penalties over output tokens only:
    ``logit -= presence * (count > 0) + frequency * count``."""
    in_output = p.output_counts > 0
    if p.prompt_mask is not None:
        seen = in_output | p.prompt_mask
        penalty = torch.where(seen, p.repetition.unsqueeze(1), torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - p.frequency.unsqueeze(1) * p.output_counts
    return logits - p.presence.unsqueeze(1) * in_output.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's. Compared in log
    space (logit - max >= log min_p) to skip a softmax; min_p = 0 gives log 0 = -inf, keeping all."""
    max_logit = logits.amax(dim=-1, keepdim=True)
    keep = logits - max_logit >= torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's ``top_k`` best tokens (top_k = V: all), then the smallest set of those whose
    cumulative probability reaches ``top_p`` (the top token always survives). Tokens tied with
    the k-th best are kept too."""
    if top_p is None:
        return _apply_top_k_only(logits, top_k) if top_k is not None else logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # Ascending order: a token goes when the mass at or below it is within 1 - top_p.
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    # A partial topk up to the largest k in use is much cheaper than a full sort of the vocabulary.
    vocab = logits.shape[-1]
    enabled = top_k < vocab
    k = torch.where(enabled, top_k, torch.ones_like(top_k))
    max_k = int(k.max())
    best = logits.topk(max_k, dim=-1).values
    kth = best.gather(1, (k - 1).unsqueeze(1))
    kth = kth.masked_fill(~enabled.unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def random_sample(probs: torch.Tensor, seeds: dict[int, int]) -> torch.Tensor:
    """One token per row, each drawn with its probability: one uniform draw per row placed on the
    row's cumulative distribution (inverse CDF). Rows in ``seeds`` draw from a generator seeded
    with that value, the rest from the global RNG. One draw per row, not one per token: on a quiet
    2-core CPU an exponential race over a 64 x 49k batch took 102 ms (torch's exponential_, about
    60% of a 64-token decode step's GEMMs), this 3.2 ms (benchmarks/sampler_cpu.py)."""
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=torch.float64)
    if seeds:
        generator = torch.Generator(device=probs.device)  # re-seeded per row: no state between rows or steps
        for row, seed in seeds.items():
            u[row] = torch.rand(1, generator=generator.manual_seed(seed), device=probs.device, dtype=torch.float64)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # below the total, so that the search ends on a token with probability (a zero-probability
    # token never moves the sum: it is skipped)
    target = torch.minimum((u * total).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def random_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution a random row draws from, given its processed logits (process_logits):
    temperature, then min_p, top_k and top_p, then softmax. [B, V] float32."""
    if meta.temperature is not None:
        logits = logits / meta.temperature.unsqueeze(1)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return logits.softmax(dim=-1, dtype=torch.float32)


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    return random_sample(random_probs(logits, meta), meta.seeds)


def _gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> SamplerOutput:
    sampled_col = sampled.unsqueeze(1)
    sampled_logprob = raw_logprobs.gather(1, sampled_col)
    ranks = (raw_logprobs > sampled_logprob).sum(dim=-1) + 1
    token_ids, logprobs = sampled_col, sampled_logprob
    if k > 0:
        top = raw_logprobs.topk(k, dim=-1)
        token_ids = torch.cat([sampled_col, top.indices], dim=1)
        logprobs = torch.cat([sampled_logprob, top.values], dim=1)
    return SamplerOutput(sampled, token_ids, logprobs, ranks)
