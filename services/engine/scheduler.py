"""Continuous batching with chunked prefill and preemption by recompute.

Every step hands out a token budget: running decodes first (one token each, so a long prompt
never starves them), then running prefill chunks, then waiting requests in queue order. When the
pool runs out of blocks a running request is preempted: its blocks are freed and it goes back
to the queue, to be recomputed (mostly from the prefix cache) later. Under the fcfs policy the
queue is in arrival order and the newest request is preempted, going back to the front; under
the priority policy the queue is ordered by (priority, arrival) and the request with the
largest (priority, arrival) is preempted.

Steps may be planned before the previous step's tokens are known (async scheduling): a request
that samples in a step in flight counts that token as a placeholder, so the next step schedules
its decode at once and the worker feeds its own sampled token in. When the result arrives the
placeholder is filled in; a request that finished with it (EOS, a stop id) had one more step
planned, whose token is discarded. With pipeline stages (micro_batches) a request is in one step
in flight at most: the steps in flight hold disjoint sets of requests, so every stage has work, as
vLLM's virtual engines do. A request whose placeholders reach max_tokens is not scheduled again.
No request needs its token on the engine before its next step: the worker advances grammars,
penalties, min_tokens, seeded noise and speculative proposals (spec_decode.py) from its own copy
of the tokens; EOS, stop ids, stop strings and accepted proposals are reconciled one step late.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

import numpy as np

from services.engine.adapter_slots import AdapterSlots
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from services.engine.spec_decode import STEP_TOKENS, SpecDecoder
from services.engine.step_update import StepUpdate
from shared.config import CacheConfig, SchedulerConfig
from shared.protocol import (
    CachedRequestData,
    NewRequestData,
    RequestDelta,
    StepPlan,
)
from shared.speculative import SpeculativeConfig, proposals_on_workers


class Scheduler(StepUpdate):
    def __init__(
        self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int, first_step_id: int = 0,
        speculative: SpeculativeConfig | None = None, micro_batches: int = 1, max_loras: int = 0, draft_cost: float = 0.0,
    ):
        """max_loras: the most different LoRA adapters one step may run (the workers' adapter slots)."""
        self.config = config
        self.max_loras = max_loras
        on_workers = proposals_on_workers(config.async_scheduling, micro_batches)
        self.spec = None if speculative is None else SpecDecoder(speculative, draft_cost, on_workers, micro_batches)
        self._kept_blocks: dict[str, int] = {}  # rolled back by a verification: blocks kept, told with the next plan
        # pipeline stages: the requests are split among this many steps in flight, disjoint
        self.micro_batches = micro_batches
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # tokens sampled in steps in flight, not known yet, by request id
        self.placeholders: dict[str, int] = {}
        # per step in flight: the requests it computes, as (request, its preemption count when
        # planned, proposals it verifies), so a result is applied only to the same request in the same run
        self._in_flight: dict[int, dict[str, tuple[Request, int, int]]] = {}
        self._known_to_worker: set[str] = set()
        self._finished_ids: list[str] = []
        self._step_id = first_step_id  # the service starts it at random: a stale result never matches
        self.num_preemptions = 0
        self.num_pooled_requests = 0  # pooling requests finished with their vector, and their tokens
        self.num_pooled_tokens = 0
        self.priority = config.policy == "priority"
        # arrival to first schedule, of the requests started since the latest step (or since the
        # metrics took them)
        self.queue_times: list[float] = []

    # ----- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        if request.priority and not self.priority:
            raise ValueError(f"priority {request.priority} needs the priority scheduling policy (this engine: fcfs)")
        self.requests[request.req_id] = request
        self._enqueue(request, front=False)

    def admission_error(self, request: Request) -> tuple[str, str] | None:
        """(reason, message) when the waiting queue cannot take `request` now (it would pass a
        queue limit), else None. The service answers 503: the client may retry later."""
        if len(self.waiting) >= self.config.max_num_queued_requests:
            return "queued_requests", f"the engine's queue is full ({len(self.waiting)} requests waiting); retry later"
        queued = sum(r.num_tokens for r in self.waiting)
        if self.waiting and queued + request.num_tokens > self.config.max_queued_tokens:
            return "queued_tokens", f"the engine's queue is full ({queued} tokens waiting); retry later"
        return None

    def _enqueue(self, request: Request, front: bool) -> None:
        if self.priority:
            bisect.insort(self.waiting, request, key=_priority_key)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def oldest_waiting_age(self) -> float:
        """Seconds since the oldest waiting request arrived (0 with none waiting)."""
        return time.monotonic() - min(r.arrival_time for r in self.waiting) if self.waiting else 0.0

    def abort(self, req_ids: list[str]) -> list[RequestDelta]:
        out = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            out.append(RequestDelta(req_id, [], finish_reason="abort"))
        return out

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Take an unfinished request out of the queues for good and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.placeholders.pop(request.req_id, None)
        self._kept_blocks.pop(request.req_id, None)
        self.kv.free(request)
        if self.spec is not None:
            self.spec.release(request)
        del self.requests[request.req_id]
        if request.req_id in self._known_to_worker:
            self._known_to_worker.discard(request.req_id)
            self._finished_ids.append(request.req_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def adapter_names(self) -> tuple[list[str], list[str]]:
        """The LoRA adapters of the running requests, and of the waiting ones (sorted names)."""
        return _adapters(self.running), _adapters(self.waiting)

    # ----- scheduling --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        self.queue_times = []
        scheduled: dict[str, int] = {}
        verifies: dict[str, int] = {}  # per decoding request: the proposals it verifies after its last token
        new_blocks: dict[str, list[int]] = {}
        preempted = False

        busy, most = self._micro_batch()
        todo = {r.req_id: self._num_to_compute(r) for r in self.running if r.req_id not in busy}
        decodes = [r for r in self.running if todo.get(r.req_id) == 1]
        prefills = [r for r in self.running if todo.get(r.req_id, 0) > 1]
        spec_room = STEP_TOKENS - min(len(decodes), most)  # proposals' share of a step (spec_decode.py)
        for request in decodes + prefills:
            if budget == 0 or len(scheduled) >= most:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(todo[request.req_id], budget)
            if self.spec is not None and todo[request.req_id] == 1:
                room = max(0, min(budget - 1, spec_room))
                verifies[request.req_id] = self.spec.verify(request, room, len(self.running), self.placeholders)
                num_new += verifies[request.req_id]
                spec_room -= verifies[request.req_id]
            while (blocks := self.kv.allocate_slots(request, num_new)) is None:
                victim = max(self.running, key=_priority_key) if self.priority else self.running[-1]
                budget += scheduled.pop(victim.req_id, 0)
                new_blocks.pop(victim.req_id, None)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if blocks is None:
                continue
            scheduled[request.req_id] = num_new
            new_blocks[request.req_id] = blocks
            budget -= num_new

        slots, index = AdapterSlots(self.max_loras, self.running), 0
        while (index < len(self.waiting) and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs and len(scheduled) < most):
            request = self.waiting[index]
            if not slots.admits(request):
                index += 1  # no adapter slot for it now: the requests behind it go on
                continue
            computed = self.kv.get_computed_blocks(request)
            num_computed = len(computed) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if request.pooling is not None and num_new < request.num_tokens:
                break  # a pooling request is computed whole, in one step
            blocks = self.kv.allocate_slots(request, num_new, computed)
            if blocks is None:
                break
            del self.waiting[index]
            request.num_computed_tokens = num_computed
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_computed
                request.first_scheduled_time = time.monotonic()
                self.queue_times.append(request.first_scheduled_time - request.arrival_time)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            slots.started(request)
            self._known_to_worker.discard(request.req_id)  # resent in full
            scheduled[request.req_id] = num_new
            new_blocks[request.req_id] = blocks
            budget -= num_new

        return self._make_plan(scheduled, new_blocks, verifies)

    def _micro_batch(self) -> tuple[set[str], int]:
        """The requests in steps in flight, and the most requests this step may take: with micro
        batches, a request is in one step in flight at most and each step takes its share of
        the requests (so every pipeline stage gets work); otherwise none and no limit."""
        if self.micro_batches == 1:
            return set(), self.config.max_num_seqs
        busy = {r for step in self._in_flight.values() for r in step}
        return busy, max(1, -(-(len(self.running) + len(self.waiting)) // self.micro_batches))

    def _num_to_compute(self, request: Request) -> int:
        """Tokens of a running request not computed yet, counting those in flight (0 when the
        tokens in flight already reach max_tokens: its last step is planned)."""
        pending = self.placeholders.get(request.req_id, 0)
        if pending and request.num_output_tokens + pending >= request.max_tokens:
            return 0
        return request.num_tokens + pending - request.num_computed_tokens

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        # a token in flight is discarded when it arrives: the recompute samples it again
        self.placeholders.pop(request.req_id, None)
        self._kept_blocks.pop(request.req_id, None)
        request.spec_token_ids, request.num_drafting = [], 0  # the worker's proposals go with its state
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        if request.prompt_logprobs:  # not delivered yet: the recompute scores the prompt again
            request.prompt_logprobs = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, front=True)

    def _make_plan(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]], verifies: dict[str, int]) -> StepPlan:
        new_reqs, cached, spec, drafts = [], [], {}, {}
        self._step_id += 1
        in_flight = self._in_flight[self._step_id] = {}
        for req_id, num_new in scheduled.items():
            request, num_slots = self.requests[req_id], verifies.get(req_id, 0)
            in_flight[req_id] = (request, request.num_preemptions, num_slots)
            kept = self._kept_blocks.pop(req_id, None)
            if req_id in self._known_to_worker:
                cached.append(CachedRequestData(req_id, new_blocks[req_id], request.num_computed_tokens, kept))
            else:
                new_reqs.append(
                    NewRequestData(
                        req_id,
                        np.asarray(request.prompt_token_ids, dtype=np.int32),
                        np.asarray(request.output_token_ids, dtype=np.int32),
                        request.sampling_params,
                        list(request.eos_token_ids),
                        self.kv.block_ids(req_id),
                        request.num_computed_tokens,
                        request.pooling,
                        request.lora_request,
                    )
                )
                self._known_to_worker.add(req_id)
            request.num_computed_tokens += num_new
            if request.spec_token_ids:
                spec[req_id] = np.asarray(request.spec_token_ids, dtype=np.int32)
            pending = self.placeholders.get(req_id, 0)
            # it samples a token (after any proposals it verifies, counted as accepted until its result)
            if request.num_computed_tokens - num_slots == request.num_tokens + pending:
                self.placeholders[req_id] = pending + 1 + num_slots
                if self.spec is not None and self._num_to_draft(request, pending):
                    drafts[req_id] = request.num_drafting
        plan = StepPlan(self._step_id, new_reqs, cached, scheduled, self._finished_ids, spec, drafts)
        self._finished_ids = []
        return plan


def _adapters(requests) -> list[str]:
    return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})


def _priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time
