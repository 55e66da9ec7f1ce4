"""Per-request sampling state kept between steps, and the per-step tensors built from it.

``SamplingMetadata.build`` runs every step, so it only materializes the tensors the batch
actually needs: no penalty tensors unless some row uses penalties, no temperature / top-k /
top-p / min-p tensors when every row leaves them at their neutral value.

A seeded request keeps no random state between steps: the noise of its output token number p
is drawn from a generator seeded with ``noise_seed(seed, p)``. So its tokens are the same
whether it ran undisturbed, was preempted, or was recomputed by a restarted worker or engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """One request's sampling inputs: its parameters and its tokens, the prompt then the outputs
    (the one copy of them the worker keeps; ``append`` adds each sampled token)."""

    params: SamplingParams
    token_ids: list[int]
    prompt_len: int
    eos_token_ids: tuple[int, ...]
    # [V] bool, True on the tokens allowed_token_ids leaves out: built on the request's first step
    disallowed: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_ids: tuple[int, ...] | list[int],
        output_token_ids: list[int] | None = None,
    ) -> SamplingState:
        """``output_token_ids`` restores tokens generated before a preemption or a restart."""
        tokens = list(prompt_token_ids) + list(output_token_ids or ())
        return cls(params, tokens, len(prompt_token_ids), tuple(eos_token_ids))

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def disallowed_mask(self, vocab_size: int, device: torch.device | str) -> torch.Tensor:
        """[V] bool, True on every token but allowed_token_ids (which must be set), built once."""
        if self.disallowed is None:
            mask = torch.ones(vocab_size, dtype=torch.bool)
            mask[torch.tensor(self.params.allowed_token_ids, dtype=torch.long)] = False
            self.disallowed = mask.to(device)
        return self.disallowed

    def banned_by_bad_words(self) -> list[int]:
        """The last token of each bad word whose other tokens end the output (vLLM's rule: a
        one-token word is always banned; the prompt does not count)."""
        banned, n_out = [], self.num_output_tokens
        for seq in self.params.bad_words_token_ids:
            k = len(seq) - 1
            if k == 0 or (k <= n_out and self.token_ids[-k:] == seq[:-1]):
                banned.append(seq[-1])
        return banned

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy: append with ``append``."""
        return self.token_ids[self.prompt_len :]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a well-spread 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, position: int) -> int:
    """The generator seed for output token ``position`` of a request seeded with ``seed``
    (the seed is hashed before the position is mixed in, so nearby seeds, e.g. the n > 1
    children's seed + i, give unrelated streams rather than the same one shifted)."""
    return _splitmix64(_splitmix64(seed) ^ position)


@dataclass
class PenaltyTensors:
    """Inputs of ``apply_penalties``; built only when some row in the batch uses a penalty."""

    repetition: torch.Tensor  # [B] float, 1.0 = off
    presence: torch.Tensor  # [B] float, 0.0 = off
    frequency: torch.Tensor  # [B] float, 0.0 = off
    output_counts: torch.Tensor  # [B, V] float, occurrences of each token in the output
    prompt_mask: torch.Tensor | None  # [B, V] bool, None when no row uses repetition_penalty


@dataclass
class SamplingMetadata:
    """Everything the sampler needs for one step, rows in the order of the states given."""

    num_rows: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # [B] bool, only for mixed batches
    temperature: torch.Tensor | None  # [B] float (1.0 on greedy rows); None when all are 1.0
    top_k: torch.Tensor | None  # [B] long, vocab_size = off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float; None when all are 1.0
    min_p: torch.Tensor | None  # [B] float; None when all are 0.0
    seeds: dict[int, int]  # row -> noise_seed of this step's token, seeded random rows only
    max_num_logprobs: int | None  # None when no row asked for logprobs
    disallowed: tuple[torch.Tensor, torch.Tensor] | None  # rows, [rows, V] bool (allowed_token_ids)
    bad_words: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids to forbid this step
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids to forbid
    penalties: PenaltyTensors | None

    @classmethod
    def build(
        cls, states: list[SamplingState], vocab_size: int, device: torch.device | str
    ) -> SamplingMetadata:
        params = [s.params for s in states]
        greedy = [p.greedy for p in params]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        all_greedy, all_random = not random_rows, len(random_rows) == len(params)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=len(states),
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if all_greedy or all_random else _tensor(greedy, torch.bool, device),
            temperature=_random_rows_tensor(params, greedy, "temperature", 1.0, device),
            top_k=_top_k_tensor(params, greedy, vocab_size, device),
            top_p=_random_rows_tensor(params, greedy, "top_p", 1.0, device),
            min_p=_random_rows_tensor(params, greedy, "min_p", 0.0, device),
            seeds=_noise_seeds(states, random_rows),
            max_num_logprobs=max(asked) if asked else None,
            disallowed=_disallowed(states, vocab_size, device),
            bad_words=_bad_words(states, device),
            logit_bias=_logit_bias(params, vocab_size, device),
            min_tokens_mask=_min_tokens_mask(states, vocab_size, device),
            penalties=_penalties(states, vocab_size, device),
        )


def _noise_seeds(states: list[SamplingState], random_rows: list[int]) -> dict[int, int]:
    seeds = {}
    for i in random_rows:
        seed = states[i].params.seed
        if seed is not None:
            seeds[i] = noise_seed(seed, states[i].num_output_tokens)
    return seeds


def _tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    # Built on the host then copied once; non_blocking only matters (and is only safe) from pinned memory.
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _random_rows_tensor(
    params: list[SamplingParams], greedy: list[bool], name: str, neutral: float, device: torch.device | str
) -> torch.Tensor | None:
    """Per-row values of ``name``, neutral on greedy rows; None when every row is neutral."""
    values = [neutral if g else float(getattr(p, name)) for p, g in zip(params, greedy)]
    if all(v == neutral for v in values):
        return None
    return _tensor(values, torch.float32, device)


def _top_k_tensor(
    params: list[SamplingParams], greedy: list[bool], vocab_size: int, device: torch.device | str
) -> torch.Tensor | None:
    ks = [vocab_size if g or p.top_k == 0 else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
    if all(k == vocab_size for k in ks):
        return None
    return _tensor(ks, torch.long, device)


def _disallowed(
    states: list[SamplingState], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows = [i for i, s in enumerate(states) if s.params.allowed_token_ids]
    if not rows:
        return None
    return _tensor(rows, torch.long, device), torch.stack([states[i].disallowed_mask(vocab_size, device) for i in rows])


def _bad_words(states: list[SamplingState], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows, cols = [], []
    for i, s in enumerate(states):
        if s.params.bad_words_token_ids:
            banned = s.banned_by_bad_words()
            rows += [i] * len(banned)
            cols += banned
    if not rows:
        return None
    return _tensor(rows, torch.long, device), _tensor(cols, torch.long, device)


def _logit_bias(
    params: list[SamplingParams], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            if token < vocab_size:  # the frontend validates against the tokenizer; never index out of range
                rows.append(i)
                cols.append(token)
                vals.append(bias)
    if not rows:
        return None
    return (
        _tensor(rows, torch.long, device),
        _tensor(cols, torch.long, device),
        _tensor(vals, torch.float32, device),
    )


def _min_tokens_mask(
    states: list[SamplingState], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows, cols = [], []
    for i, s in enumerate(states):
        p = s.params
        if s.num_output_tokens >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids)
        if not p.ignore_eos:
            stops.update(s.eos_token_ids)
        for token in sorted(t for t in stops if t < vocab_size):
            rows.append(i)
            cols.append(token)
    if not rows:
        return None
    return _tensor(rows, torch.long, device), _tensor(cols, torch.long, device)


def _penalties(
    states: list[SamplingState], vocab_size: int, device: torch.device | str
) -> PenaltyTensors | None:
    params = [s.params for s in states]
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_other = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (use_rep or use_other):
        return None
    counts = _token_counts([s.output_token_ids for s in states], vocab_size, device)
    prompt_mask = None
    if use_rep:
        prompt_mask = _token_counts([s.prompt_token_ids for s in states], vocab_size, device) > 0
    return PenaltyTensors(
        repetition=_tensor([float(p.repetition_penalty) for p in params], torch.float32, device),
        presence=_tensor([float(p.presence_penalty) for p in params], torch.float32, device),
        frequency=_tensor([float(p.frequency_penalty) for p in params], torch.float32, device),
        output_counts=counts,
        prompt_mask=prompt_mask,
    )


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[B, V] float counts of each token per row, by one scatter over a padded id matrix."""
    width = max((len(t) for t in token_lists), default=0)
    # Pad with an extra column id (vocab_size) that is sliced away after the scatter.
    padded = [t + [vocab_size] * (width - len(t)) for t in token_lists]
    ids = _tensor(padded, torch.long, device).view(len(token_lists), width)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]
