"""Speculative proposals made on the worker after a step, for the request's next step to verify.

With async scheduling the engine plans a request's next step before this step's tokens reach it,
so it cannot propose from them. The worker, which has them, proposes instead, for every method:
the draft model (draft_runner.py; an EAGLE head, eagle_runner.py), prompt lookup and suffix decoding (the engine's own proposers,
run over the worker's copy of the tokens). Each plan says how many tokens to propose per request
(StepPlan.num_draft_tokens, the engine's adaptive rule); the proposals stay with the request
(RequestState.draft_token_ids), the engine reserves that many slots in its next step, and the
worker verifies in them what it proposed (request_table.py). The result says how many it verified
(StepResult.num_proposed); the engine learns how many were accepted one step late.

Without async scheduling, or over pipeline stages (shared/speculative.py proposals_on_workers),
the engine proposes by prompt lookup and suffix decoding itself, and the draft model's proposals
go back to it (StepResult.draft_token_ids) to be scheduled. A worker started without
--async-scheduling beside an engine with it still gives the right tokens (it verifies the draft's
proposals in the slots, and none of prompt lookup's or suffix decoding's). Suffix decoding's tree
of recent outputs lives here with async scheduling: the outputs of the requests this worker
dropped (finished, failed, or resent after preemption). Every rank proposes the same: the same
plans over the same tokens, and the same random draws. A request with a grammar has its
proposals cut at the first token the grammar forbids (cut_by_grammar): here as they are made,
and in the table for the engine's, so no verification slot goes to a token that cannot be kept.
"""

from __future__ import annotations

import numpy as np
import torch

from services.worker.draft_runner import DraftRunner
from services.worker.input_batch import StepInputs
from services.worker.rejection_sampler import rejection_sampled
from services.worker.request_table import RequestState, RequestTable
from services.worker.structured_output import StructuredOutputs
from shared.config import EngineConfig
from shared.proposers.ngram import NgramProposer
from shared.proposers.suffix import SuffixProposer
from shared.protocol import StepPlan
from shared.speculative import proposals_on_workers


class WorkerProposer:
    """Runs the proposer of the configured method after each step (see the module)."""

    def __init__(self, config: EngineConfig, draft: DraftRunner | None):
        """draft: the draft model's runner (method draft_model). Without speculative decoding
        this proposes nothing."""
        spec = self.spec = config.speculative
        on_engine = not proposals_on_workers(config.scheduler.async_scheduling, config.parallel.pipeline_parallel_size)
        self.draft = draft
        # prompt lookup and suffix decoding propose here only with async scheduling
        self.proposes = draft is None and spec is not None and not on_engine
        self.reset()
        self.returns = draft is not None and on_engine  # the draft's proposals go back to the engine
        self.k = spec.num_speculative_tokens if spec is not None else 0
        # every token of a request reaches this rank as it is sampled (over pipeline stages, the
        # earlier ones learn a step's tokens with a later plan)
        self.one_stage = config.parallel.pipeline_parallel_size == 1
        self.max_model_len = config.model.max_model_len

    def reset(self) -> None:
        """Forget what was learnt from earlier requests (a new engine starts from scratch)."""
        spec = self.spec
        if self.draft is not None:
            self.draft.reset()
        self.lookup = None if not self.proposes else (
            SuffixProposer(spec) if spec.method == "suffix" else NgramProposer(*spec.lookup_range))

    def propose(self, plan: StepPlan, table: RequestTable, samplers: set[str], inputs: StepInputs,
                hidden: torch.Tensor) -> dict[str, np.ndarray]:
        """Propose plan.num_draft_tokens tokens for each of `samplers` (the requests that sampled
        this step, their tokens appended; call before the table advances) and keep them with
        the requests; inputs and hidden: the step's, and the target's output (an EAGLE head
        drafts from them). Returns the proposals for the engine ({} unless they go back to it)."""
        if self.draft is not None:
            proposals = self.draft.propose(plan, table, samplers, inputs, hidden)
        elif self.lookup is None or not plan.num_draft_tokens:
            return {}
        else:
            proposals = {}
            for req_id, n in plan.num_draft_tokens.items():
                state = table.states.get(req_id)
                if state is None or req_id not in samplers:
                    continue
                # a proposal's position stays below max_model_len
                tokens = self.lookup.propose_for(state, min(n, self.k, self.max_model_len - state.num_tokens))
                if tokens:
                    proposals[req_id] = np.asarray(tokens, dtype=np.int32)
        kept = {}
        for req_id, tokens in proposals.items():
            state = table.states[req_id]
            state.draft_token_ids = self.cut_by_grammar(state, tokens.tolist(), table.structured)
            if state.draft_token_ids:
                kept[req_id] = tokens[: len(state.draft_token_ids)]
        return kept if self.returns else {}

    def cut_by_grammar(self, state: RequestState, tokens: list[int], structured: StructuredOutputs | None) -> list[int]:
        """A request's proposals up to the first its grammar forbids (StructuredOutputs.allowed_prefix;
        call where its matcher has seen every sampled token). Not a draft's rejection-sampled
        proposals: cut there, the position's token would be sampled from p where rejection
        sampling takes it from what is left of p after the draft's q, which changes its distribution."""
        if structured is None or (self.draft is not None and rejection_sampled(state.sampling.params)):
            return tokens
        return structured.allowed_prefix(state.req_id, tokens)

    @staticmethod
    def verified(states: list[RequestState]) -> dict[str, int]:
        """How many proposals each request verifies this step (call before the table advances)."""
        return {s.req_id: len(s.spec_token_ids) for s in states if s.spec_token_ids}

    def release(self, req_id: str, state: RequestState | None) -> None:
        """A request's state left the table: suffix decoding drops its tree, its output joins
        the tree of recent outputs; an EAGLE head drops the target states it kept for it."""
        if self.draft is not None:
            self.draft.release(req_id)
        if isinstance(self.lookup, SuffixProposer):
            if state is not None:
                self.lookup.release(state)
            self.lookup.trees.pop(req_id, None)
