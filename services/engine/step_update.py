"""The scheduler's half that applies what the workers report: a step's result (sampled tokens, one
or a verification's several, appended up to the first stop; pooled vectors, failures and prompt
logprobs), each only to the request and run the step was planned for; and their loss (every
running request recomputed on restarted workers)."""

from __future__ import annotations

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from shared.protocol import RequestDelta, StepPlan, StepResult, TokenLogprobs


class StepUpdate:
    """Mixed into Scheduler (scheduler.py), whose state it reads and changes: requests, running,
    placeholders, _in_flight, kv, spec, _kept_blocks, _known_to_worker, _finished_ids, the pooling
    counters, _preempt, _finish and abort."""

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestDelta]:
        """Fill in the sampled tokens and finish requests that hit a stop condition. Only the
        requests the step computed count, each in the run it was planned for: a token of a
        request that finished, was aborted or preempted since is discarded."""
        planned = self._in_flight.pop(plan.step_id, {})

        def current(req_id: str, same_run: bool = True) -> Request | None:
            request, preemptions, _ = planned.get(req_id, (None, 0, 0))
            if request is None or self.requests.get(req_id) is not request:
                return None
            return request if not same_run or request.num_preemptions == preemptions else None

        deltas = []
        for req_id, message in result.failed.items():
            if (request := current(req_id, same_run=False)) is not None:
                self._finish(request, RequestStatus.FINISHED_ERROR)
                deltas.append(RequestDelta(req_id, [], finish_reason="error", error=message))
        for req_id, scored in result.prompt_logprobs.items():
            request = current(req_id)
            if request is not None and request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(scored)
        deltas += self._pooled(result.pooled, current)
        stopped = set(result.stopped)
        for req_id, sampled in _tokens_by_request(result).items():
            request = current(req_id)
            if request is None or not self.placeholders.get(req_id):
                continue  # finished, aborted or preempted since the step was planned
            num_slots = planned[req_id][2]
            self._fill_placeholder(req_id, 1 + num_slots)
            # as many as the worker verified in the slots: its own, or the engine's up to the first
            # the request's grammar forbids
            num_proposed = min(num_slots, result.num_proposed.get(req_id, 0))
            deltas.append(self._append(request, sampled, req_id in stopped))
            drafted = result.draft_token_ids.get(req_id)
            request.draft_token_ids = [] if drafted is None else drafted.tolist()
            if num_slots:
                self._settle_proposals(request, num_slots, num_proposed, min(len(sampled) - 1, num_proposed))
        return deltas

    def restart_workers(self, num_blocks: int) -> None:
        """The workers' KV cache and request state are gone (a worker was lost or re-joined):
        preempt every running request for recompute, keeping arrival order and its tokens so far,
        and start over with an empty pool of num_blocks (no prefix cache entry points at valid KV)."""
        for request in reversed(self.running):
            self._preempt(request)
        old = self.kv
        self.kv = KVCacheManager(num_blocks, old.block_size, old.enable_caching)
        self.kv.prefix_queried_tokens, self.kv.prefix_hit_tokens = old.prefix_queried_tokens, old.prefix_hit_tokens
        self.kv.pool.num_evictions = old.pool.num_evictions
        self._known_to_worker.clear()
        self._finished_ids = []
        self._in_flight.clear()  # those steps' results never come
        self.placeholders.clear()

    def _num_to_draft(self, request: Request, pending: int) -> int:
        """SpecDecoder.num_to_draft for a request that samples in the step being planned: the
        proposals it verifies in this step and in the steps in flight count as not settled, so
        a new request waits for the outcome of its first proposals before it is asked for more
        (with async scheduling they are verified a step after they are made, and settled later)."""
        unsettled = sum(step[request.req_id][2] for step in self._in_flight.values() if request.req_id in step)
        return self.spec.num_to_draft(request, len(self.running), pending, unsettled)

    def _settle_proposals(self, request: Request, num_slots: int, num_proposed: int, num_accepted: int) -> None:
        """After a verification in num_slots slots: the KV of the slots past the accepted
        proposals is void, and blocks that held only those return to the pool (the worker learns
        with the request's next plan; a step in flight writes below the count kept)."""
        request.spec_token_ids = []
        if num_proposed:
            self.spec.record(request, num_proposed, num_accepted)
        if request.status != RequestStatus.RUNNING:
            return
        request.num_computed_tokens -= num_slots - num_accepted  # the last sampled token is computed next
        kept = self.kv.trim(request, request.num_computed_tokens)
        if kept is not None:
            self._kept_blocks[request.req_id] = kept

    def _pooled(self, pooled: dict[str, list[float]], current) -> list[RequestDelta]:
        """Pooling requests finish with their pooled vector (their blocks return to the pool)."""
        deltas = []
        for req_id, vector in pooled.items():
            request = current(req_id)
            if request is None or not self.placeholders.get(req_id):
                continue  # aborted or preempted since the step was planned
            self._fill_placeholder(req_id)
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            self.num_pooled_requests += 1
            self.num_pooled_tokens += request.num_prompt_tokens
            deltas.append(RequestDelta(req_id, [], finish_reason="stop", pooled=vector))
        return deltas

    def _fill_placeholder(self, req_id: str, num_tokens: int = 1) -> None:
        left = self.placeholders[req_id] - num_tokens
        if left:
            self.placeholders[req_id] = left
        else:
            del self.placeholders[req_id]

    def _append(
        self, request: Request, sampled: list[tuple[int, TokenLogprobs | None]], grammar_done: bool
    ) -> RequestDelta:
        """Append a step's tokens one by one, up to the first that finishes the request (the rest
        are dropped: never a token past a stop or max_tokens). grammar_done: the grammar completed
        with the last one."""
        tokens, logprobs, status = [], [], None
        for i, (token, lp) in enumerate(sampled):
            request.append_token(token)
            tokens.append(token)
            if lp is not None:
                logprobs.append(lp)
            status = request.check_stop(grammar_done=grammar_done and i == len(sampled) - 1)
            if status is not None:
                break
        delta = RequestDelta(request.req_id, tokens, logprobs, num_cached_tokens=request.num_cached_tokens)
        if request.prompt_logprobs is not None:
            delta.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
        if status is not None:
            self._finish(request, status)
            delta.finish_reason = status.value
            delta.stop_reason = request.stop_reason
        return delta

    def fail_step(self, step_id: int) -> list[str]:
        """The step failed in the worker: abort the requests it computed (their blocks return
        to the pool, the worker drops them with the next plan). Returns their ids."""
        planned = self._in_flight.pop(step_id, {})
        failed = [req_id for req_id, (request, *_) in planned.items() if self.requests.get(req_id) is request]
        self.abort(failed)
        return failed


def _tokens_by_request(result: StepResult) -> dict[str, list[tuple[int, TokenLogprobs | None]]]:
    """Each request's (token, logprobs) in order: one, or a verification's several."""
    logprobs = result.logprobs or [None] * len(result.req_ids)
    out: dict[str, list[tuple[int, TokenLogprobs | None]]] = {}
    for req_id, token, lp in zip(result.req_ids, result.sampled_token_ids, logprobs):
        out.setdefault(req_id, []).append((token, lp))
    return out
