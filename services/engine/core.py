"""The engine core: the scheduler driving an executor one step at a time.

The executor is the model runner itself in the offline engine, or the client of the worker
processes in the service stack. With async scheduling (SchedulerConfig.async_scheduling) the
core plans step N+1 before it reads the result of step N: over worker processes the workers
compute step N meanwhile; the offline engine runs the same schedule in the same order.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol

from services.engine.request import Request
from services.engine.scheduler import Scheduler
from shared.config import EngineConfig
from shared.draft_model import draft_cost
from shared.lora import LoRARequest
from shared.pooling import PoolingParams, check_pooling
from shared.processor.stop import StopStringFactory
from shared.protocol import RequestDelta, StepPlan, StepResult
from shared.sampling_params import SamplingParams


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


class Pipeline(Protocol):
    """An executor that takes a plan before the previous plan's result has been read. Results
    are collected in the order the plans were submitted."""

    def submit(self, plan: StepPlan) -> None: ...

    def collect(self, plan: StepPlan) -> StepResult: ...


class Deferred:
    """A Pipeline over an in-process executor: each plan runs when its result is collected."""

    def __init__(self, executor: Executor):
        self.executor = executor

    def submit(self, plan: StepPlan) -> None:
        pass

    def collect(self, plan: StepPlan) -> StepResult:
        return self.executor.execute(plan)


def _check_capacity(config: EngineConfig, num_blocks: int) -> None:
    capacity = num_blocks * config.cache.block_size
    if capacity < config.model.max_model_len:
        raise ValueError(
            f"the KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than max_model_len="
            f"{config.model.max_model_len}; lower max_model_len or give the cache more memory"
        )


class EngineCore:
    def __init__(
        self, config: EngineConfig, executor: Executor | Pipeline, num_blocks: int, first_step_id: int = 0
    ):
        _check_capacity(config, num_blocks)
        self.config = config
        self.pipeline: Pipeline = executor if hasattr(executor, "submit") else Deferred(executor)
        stages = config.parallel.pipeline_parallel_size
        max_loras = config.lora.max_loras if config.lora is not None else 0
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, first_step_id, config.speculative,
                                   micro_batches=stages, max_loras=max_loras, draft_cost=draft_cost(config))
        # plans submitted whose results are not read yet: at most 2 with async scheduling; with
        # pipeline stages one per stage, each a disjoint set of requests, so every stage has work
        self.depth = max(2 if config.scheduler.async_scheduling else 1, stages)
        self.in_flight: deque[StepPlan] = deque()
        self.last_num_tokens = 0  # tokens scheduled by the latest step collected
        self.last_plan_s = 0.0  # seconds the latest schedule() took
        self.last_result: StepResult | None = None  # read by the latest step(), if any
        self.stop_strings = StopStringFactory(config.model.path)  # requests with stop strings stop here
        self._collecting: StepPlan | None = None

    def make_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None = None,
        priority: int = 0,
        pooling: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Request:
        """Validate a request without admitting it (raises ValueError). output_token_ids: the
        tokens a resumed request had generated already; it continues after them. pooling: a
        pooling request (the model must be a pooling model). lora_request: the adapter it runs
        with (needs LoRA enabled)."""
        m = self.config.model
        check_pooling(self.config, len(prompt_token_ids), pooling)
        if lora_request is not None and self.config.lora is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but LoRA is not enabled "
                             "(enable_lora / --enable-lora)")
        for what, ids in (("prompt", prompt_token_ids), ("output", output_token_ids or ())):
            bad = next((t for t in ids if not 0 <= t < m.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{what} token id {bad} is out of range for a vocabulary of {m.vocab_size}")
        return Request(
            req_id, prompt_token_ids, params, m.eos_token_ids, m.max_model_len,
            output_token_ids=output_token_ids, priority=priority,
            stop_strings=self.stop_strings.checker(prompt_token_ids, params, output_token_ids or ()),
            pooling=pooling,
            lora_request=lora_request,
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, req_ids: list[str]) -> list[RequestDelta]:
        return self.scheduler.abort(req_ids)

    def has_unfinished(self) -> bool:
        """Requests unfinished, or steps in flight whose results are still to be read."""
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def step(self) -> list[RequestDelta]:
        """Plan and submit the next step; then read the oldest result in flight, unless async
        scheduling leaves it computing while the next plan is made. Returns what the result
        added to each request ([] when none was read)."""
        self.last_result = None
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        self.last_plan_s = time.perf_counter() - start
        submitted = bool(plan.num_scheduled_tokens or plan.finished_req_ids)
        if submitted:
            self.pipeline.submit(plan)
            self.in_flight.append(plan)
        if not self.in_flight or (submitted and len(self.in_flight) < self.depth):
            return []
        plan = self._collecting = self.in_flight.popleft()
        result = self.last_result = self.pipeline.collect(plan)
        self._collecting = None
        self.last_num_tokens = plan.total_num_scheduled_tokens
        return self.scheduler.update(plan, result)

    def restart_workers(self, num_blocks: int) -> None:
        """Carry on over workers that start afresh with num_blocks KV blocks: every unfinished
        request is recomputed from its prompt and the tokens it has so far (ValueError, with
        nothing changed, when num_blocks cannot hold max_model_len)."""
        _check_capacity(self.config, num_blocks)
        self.scheduler.restart_workers(num_blocks)
        self.in_flight.clear()
        self._collecting = None

    def fail_last_step(self) -> list[str]:
        """After collecting a result raised: abort the requests of that step (their blocks return
        to the pool, the worker drops them with the next plan) so every other request carries on.
        Returns the ids of the requests that failed."""
        if self._collecting is None:
            return []
        failed = self.scheduler.fail_step(self._collecting.step_id)
        self._collecting = None
        return failed
