"""The worker's persistent request table: per-request state kept between steps, updated from
step-plan deltas, and advanced by each step's sampled tokens.

Whatever goes wrong with one request (a bad id or count in the plan, a sampling state that
cannot be built, a grammar that does not compile) fails that request alone: its state is
dropped, the reason kept for StepResult.failed, and the rest of the step goes on without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.worker.layers.sampler import SamplingState
from services.worker.request_checks import (
    WorkerLimits,
    check_block_ids,
    check_new_request,
    check_proposals,
    check_schedule,
)
from services.worker.structured_output import StructuredOutputs
from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.protocol import CachedRequestData, NewRequestData, StepPlan

log = logging.getLogger(__name__)

NO_STATE = "the worker holds no state for this request"
MAX_REFUSED = 4096  # failed requests remembered until the engine lists them as finished
MAX_MESSAGE_CHARS = 1000  # a reason goes back to the client; it may quote the client's input


@dataclass
class RequestState:
    req_id: str
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState  # holds the request's tokens (its grammar matcher: StructuredOutputs)
    spec_token_ids: list[int] = field(default_factory=list)  # proposed tokens this step verifies
    pooling: PoolingParams | None = None  # a pooling request: pooled once its prompt is computed
    lora_request: LoRARequest | None = None  # the adapter it runs with
    num_draft_computed: int = 0  # tokens whose KV the draft model holds (services/worker/draft_runner.py)
    # proposals made here after its latest step, for its next step to verify (services/worker/proposals.py)
    draft_token_ids: list[int] = field(default_factory=list)
    num_scheduled: int = 0  # tokens it computes this step (its plan count less proposal slots left unused)

    @property
    def token_ids(self) -> list[int]:
        """The prompt then the outputs (the sampling state's list, not a copy)."""
        return self.sampling.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.sampling.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.token_ids[self.sampling.prompt_len :]

    @property
    def prompt_len(self) -> int:
        return self.sampling.prompt_len


class RequestTable:
    """The worker's view of every request in flight, updated from step-plan deltas."""

    def __init__(self, limits: WorkerLimits, structured: StructuredOutputs | None = None, proposer=None):
        """proposer: the worker's speculative proposer (proposals.py), told of each request that
        leaves. A decoding request scheduled for more than its last token without proposals in
        the plan verifies in those slots what the worker proposed after its latest step (async
        scheduling), if anything."""
        self.limits = limits  # every plan entry is checked against the worker's ranges
        self.block_size = limits.block_size
        self.structured = structured
        self.proposer = proposer
        self.states: dict[str, RequestState] = {}
        self.failed: dict[str, str] = {}  # requests refused since the last take_failed()
        # requests failed here (or on the last stage) that the engine has not yet listed as finished:
        # a plan made before it heard (async scheduling, pipeline stages) skips them, unreported again
        self.refused: dict[str, None] = {}

    def apply(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids:
            self.drop(req_id)
            self.refused.pop(req_id, None)
        for new in plan.new_requests:
            self.refused.pop(new.req_id, None)
            self._guarded(new.req_id, self._add, new)
        for cached in plan.cached_requests:
            self._guarded(cached.req_id, self._update, cached)

    def fail(self, req_id: str, message: str) -> None:
        """Drop a request's state; the engine learns why from the step's result (once: a plan
        made before the engine heard of the failure does not report it again)."""
        if req_id not in self.refused:
            self.failed[req_id] = message[:MAX_MESSAGE_CHARS]
        self.dropped_as_failed(req_id)

    def dropped_as_failed(self, req_id: str) -> None:
        """Drop a request that failed, reported here or by the last pipeline stage."""
        self.drop(req_id)
        self.refused[req_id] = None
        if len(self.refused) > MAX_REFUSED:  # ids the engine never lists again (finished meanwhile)
            del self.refused[next(iter(self.refused))]

    def drop(self, req_id: str) -> None:
        """Forget a request's state (no failure to report)."""
        state = self.states.pop(req_id, None)
        if self.structured is not None:
            self.structured.drop(req_id)
        if self.proposer is not None:
            self.proposer.release(req_id, state)

    def clear(self) -> None:
        """Forget every request (and the failures not yet reported)."""
        self.states.clear()
        self.failed.clear()
        self.refused.clear()
        if self.structured is not None:
            self.structured.clear()

    def _guarded(self, req_id: str, stage, arg) -> None:
        try:
            stage(arg)
        except ValueError as exc:  # a bad request, e.g. a constraint that does not compile
            self.fail(req_id, str(exc))
        except Exception as exc:  # anything else: still this request's alone
            log.exception("request %s failed in the worker", req_id)
            self.fail(req_id, f"the worker could not run this request: {type(exc).__name__}: {exc}")

    def _update(self, cached: CachedRequestData) -> None:
        state = self.states.get(cached.req_id)
        if state is None:
            raise ValueError(NO_STATE)
        check_block_ids(cached.new_block_ids, self.limits.num_blocks)
        kept = cached.num_kept_blocks
        if kept is not None:
            if kept > len(state.block_ids):
                raise ValueError(f"cannot keep {kept} of the request's {len(state.block_ids)} blocks")
            del state.block_ids[kept:]  # speculative decoding rolled back
        state.block_ids.extend(cached.new_block_ids)
        # the engine counts the proposals of steps it has no result of as accepted: where this rank
        # has every token as sampled (one pipeline stage), it knows better
        knows = self.proposer is not None and self.proposer.one_stage
        state.num_computed_tokens = min(state.num_computed_tokens if knows else cached.num_computed_tokens,
                                        cached.num_computed_tokens)

    def _add(self, new: NewRequestData) -> None:
        self.drop(new.req_id)  # resumed after preemption: rebuilt from the plan
        check_new_request(new, self.limits)
        prompt, outputs = new.prompt_token_ids.tolist(), new.output_token_ids.tolist()
        if new.sampling_params.structured_outputs is not None:
            if self.structured is None:
                raise ValueError("this worker does not support structured outputs")
            self.structured.add(new.req_id, new.sampling_params.structured_outputs, outputs)
        sampling = SamplingState.create(new.sampling_params, prompt, tuple(new.eos_token_ids), outputs)
        self.states[new.req_id] = RequestState(
            new.req_id, list(new.block_ids), new.num_computed_tokens, sampling, pooling=new.pooling,
            lora_request=new.lora_request,
        )

    def runnable(self, plan: StepPlan) -> list[tuple[RequestState, int]]:
        """The plan's requests this table can run, with their token counts, in the step's row
        order: decodes first, longest context first; then prefill chunks, longest first (the
        torch attention backend groups requests of similar length to limit padding). A request
        it cannot run is failed."""
        order = sorted(
            ((s, s.num_scheduled) for r, n in plan.num_scheduled_tokens.items() if (s := self._schedulable(plan, r, n))),
            key=lambda sn: (sn[1] != 1, -sn[1], -sn[0].num_computed_tokens),
        )
        return order

    def _schedulable(self, plan: StepPlan, req_id: str, n: int) -> RequestState | None:
        """The request's state, its num_scheduled and proposals set; None for a request refused
        earlier, or failed now for a count (or proposed tokens) its state cannot take."""
        state = self.states.get(req_id)
        if state is None:
            if req_id not in self.failed:
                self.fail(req_id, NO_STATE)
            return None
        proposed = plan.spec_token_ids.get(req_id)
        state.spec_token_ids = [] if proposed is None else proposed.tolist()
        if proposed is None and state.num_computed_tokens == state.num_tokens - 1:
            state.spec_token_ids = state.draft_token_ids[: n - 1]  # its own, in the slots the engine reserved
            n = min(n, 1 + len(state.spec_token_ids))
        state.draft_token_ids = []
        num_tokens = len(state.token_ids) + len(state.spec_token_ids)
        try:
            check_proposals(proposed, len(state.token_ids), state.num_computed_tokens, self.limits)
            check_schedule(num_tokens, state.num_computed_tokens, len(state.block_ids), n, self.limits)
        except ValueError as exc:
            self.fail(req_id, str(exc))
            return None
        # the engine's proposals, cut by the grammar: every rank's matcher has seen every sampled
        # token (an earlier pipeline stage's, from the outcomes before this plan), so all cut alike
        if proposed is not None and self.proposer is not None:
            kept = self.proposer.cut_by_grammar(state, state.spec_token_ids, self.structured)
            n -= len(state.spec_token_ids) - len(kept)
            state.spec_token_ids = kept
        state.num_scheduled = n
        return state

    def take_failed(self) -> dict[str, str]:
        failed, self.failed = self.failed, {}
        return failed

    def advance(self, plan: StepPlan) -> None:
        """The step's tokens are computed (its sampled tokens were appended as they were
        sampled); of a verification's, those up to its last sampled token."""
        for req_id, n in plan.num_scheduled_tokens.items():
            state = self.states.get(req_id)
            if state is None:
                continue
            if state.spec_token_ids:
                state.num_computed_tokens = len(state.token_ids) - 1
                state.spec_token_ids = []
            else:
                state.num_computed_tokens += min(n, state.num_scheduled)
