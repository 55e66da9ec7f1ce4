"""Speculative decoding on the engine: proposals made where the token history lives.

The scheduler asks `SpecDecoder.propose` for a decoding request's proposed tokens; it schedules
them after the request's last token, the workers compute all of them in one forward and sample
every position, and the result holds the proposed tokens that matched what was sampled, then
one sampled token. Sampling each position from the target's own distribution and keeping a
proposal only where it equals the sample is rejection sampling for a point-mass proposal, so
every sampling parameter keeps its distribution. No torch here: the proposers of prompt lookup
and suffix decoding (shared/proposers/, which the workers run too) are numpy and plain Python.
With method draft_model (or eagle, eagle3) the proposals come from the workers' draft model instead, returned with
the previous step's result (Request.draft_token_ids); each plan tells the workers how many to
draft per request (`num_to_draft`: the adaptive k with the draft's cost added, so a request
whose drafts do not pay drafts nothing and costs no draft forward), and the adaptive k trims them.
With async scheduling (`on_workers`) a request's next step is planned before this step's tokens
reach the engine, so every method proposes on the workers (services/worker/proposals.py): the
plan says how many to propose (`num_to_draft`), the request's next step reserves that many slots
(`verify`), and the worker verifies what it proposed in them.
"""

from __future__ import annotations

from services.engine.request import Request
from shared.proposers.ngram import NgramProposer
from shared.proposers.suffix import SuffixProposer
from shared.speculative import SpeculativeConfig


class DraftModelProposer:
    """method draft_model: what the workers' draft model proposed after the request's tokens,
    returned with the previous step's result (Request.draft_token_ids)."""

    def propose_for(self, request: Request, k: int) -> list[int]:
        return request.draft_token_ids[:k]

    def release(self, request: Request) -> None:
        """Nothing is kept here: the proposals live on the request."""


# Running requests at which a step is taken to be compute-bound: past it, every proposed token
# costs about as much as a decoded one. Measured on CPU, where a decode step runs in one C call
# (kernels/decode_step_cpu.c) up to STEP_TOKENS tokens: on a quiet 2-core AMD EPYC,
# `benchmarks/spec_decode.py --workloads repetitive random --concurrency 16 32 --methods ngram
# --compute-bound-batch 16 32 64` ran ngram at 1.00x, 1.22x and 1.20x plain decoding at 16 streams
# and 1.04x, 1.04x and 1.10x at 32 on the repetitive workload (99% accepted; with 16 nothing is
# proposed there), and 0.99-1.04x on random prompts, where ngram finds nothing to propose. (When
# the C step took at most 64 tokens, 64 had run 0.22x at 16 streams: its verify steps left it.)
# With alpha's prior of 1/2 a request starts proposing in steps of up to 32 requests.
COMPUTE_BOUND_BATCH = 64
# The most tokens a step verifying proposals may compute: the CPU's one-call decode step's limit
# (kernels/f32_linear_cpu.py MAX_ROWS), past which a step runs layer by layer, several times slower.
# Requests scheduled first take the room.
STEP_TOKENS = 128
DECAY = 0.8  # weight of a request's earlier verifications in its acceptance estimate


class SpecDecoder:
    """Per-step proposals for the scheduler, and the counts behind the metrics (vLLM's drafts,
    draft tokens, accepted tokens and accepted tokens per position).

    Adaptive k: a request's proposal j (from 1) is worth verifying when the chance that it is
    accepted, alpha ** j, is at least what verifying it costs relative to the step's output,
    step_batch / COMPUTE_BOUND_BATCH. alpha is the request's measured per-token acceptance
    (recent verifications weigh most; 1/2 before any), so a request whose proposals keep
    failing stops proposing, and a large batch turns speculation down, then off. step_batch is
    the requests one step computes: the running ones, split among the micro batches in flight
    over pipeline stages (each stage computes one step's share at a time).
    """

    def __init__(self, config: SpeculativeConfig, draft_cost: float = 0.0, on_workers: bool = False,
                 micro_batches: int = 1):
        """draft_cost: what drafting one token costs a request, as a fraction of a decode step
        (method draft_model; shared/draft_model.py draft_cost). on_workers: every method proposes
        on the workers (async scheduling). micro_batches: steps in flight that share the running
        requests (pipeline stages)."""
        self.config = config
        self.draft_cost = draft_cost
        self.on_workers = on_workers
        self.micro_batches = micro_batches
        self.compute_bound_batch = COMPUTE_BOUND_BATCH  # benchmarks/spec_decode.py --compute-bound-batch tries others
        self.proposer = (None if on_workers else SuffixProposer(config) if config.method == "suffix"
                         else DraftModelProposer() if config.model_drafts
                         else NgramProposer(*config.lookup_range))
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens

    def propose(self, request: Request, room: int, num_running: int) -> list[int]:
        """Up to num_speculative_tokens tokens to verify after the request's last token: none
        while the batch is large enough (disable_by_batch_size), and never more than the
        request may still generate beyond the token this step samples anyway, or `room`
        (the step's token budget left after its last token)."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running >= limit:
            return []
        k = min(self.config.num_speculative_tokens, room, request.max_tokens - request.num_output_tokens - 1)
        return self.proposer.propose_for(request, self._worth(request, k, num_running))

    def verify(self, request: Request, room: int, num_running: int, placeholders: dict[str, int]) -> int:
        """How many proposed tokens a decoding request verifies in the step being planned, after
        its last token: the engine's proposals (`propose`, set in Request.spec_token_ids), or
        with proposals on the workers, as many of those made after its latest step
        (Request.num_drafting) as `room` allows and max_tokens leaves room for, its tokens in
        steps in flight (placeholders) counted as if every proposal were accepted."""
        if not self.on_workers:
            request.spec_token_ids = self.propose(request, room, num_running)
            return len(request.spec_token_ids)
        left = request.max_tokens - request.num_output_tokens - placeholders.get(request.req_id, 0) - 1
        return max(0, min(request.num_drafting, room, left))

    def num_to_draft(self, request: Request, num_running: int, pending: int = 0, num_slots: int = 0) -> int:
        """How many tokens the workers should propose after this step for a request that samples
        in it (method draft_model, or any method on the workers). pending: its tokens in steps in
        flight before this one; num_slots: the proposals this step and the steps in flight verify
        (a request whose first proposals are among them waits for how they fare, rather than
        probing twice). Drafting is paid now whether or not the proposals are verified, so its
        cost joins the verification's; the
        engine's proposals then drafted are trimmed again by `propose` with the acceptance
        measured meanwhile. Sets Request.num_drafting to it."""
        request.num_drafting = self._num_to_draft(request, num_running, pending, num_slots)
        return request.num_drafting

    def _num_to_draft(self, request: Request, num_running: int, pending: int, num_slots: int) -> int:
        limit = self.config.disable_by_batch_size
        if not (self.on_workers or self.config.model_drafts) or (limit is not None and num_running >= limit):
            return 0
        if num_slots and request.spec_acceptance == (0.0, 0.0):
            return 0  # its first proposals are being verified: wait for how they fare
        # after this step's token, the next step's sampled token must still fit after the drafts
        k = min(self.config.num_speculative_tokens, request.max_tokens - request.num_output_tokens - pending - 2)
        return self._worth(request, k, num_running, self.draft_cost)

    def release(self, request: Request) -> None:
        """The request left the scheduler (finished, failed or aborted)."""
        if self.proposer is not None:
            self.proposer.release(request)

    def _worth(self, request: Request, k: int, num_running: int, extra_cost: float = 0.0) -> int:
        """How many of up to k proposals are worth verifying (see the class docstring), each
        costing extra_cost more (drafting it)."""
        step_batch = -(-num_running // self.micro_batches)
        cost = min(1.0, step_batch / self.compute_bound_batch) + extra_cost
        tested, accepted = request.spec_acceptance
        alpha = (accepted + 1) / (tested + 2)
        n = 0
        while n < k and alpha ** (n + 1) >= cost:
            n += 1
        return n

    def record(self, request: Request, num_proposed: int, num_accepted: int) -> None:
        """One verification: num_accepted of num_proposed tokens matched what was sampled."""
        tested = num_accepted + (num_accepted < num_proposed)  # the first mismatch was tested too
        old_tested, old_accepted = request.spec_acceptance
        request.spec_acceptance = (DECAY * old_tested + tested, DECAY * old_accepted + num_accepted)
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1
