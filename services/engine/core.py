"""The engine core: the scheduler driving an executor one step at a time.

The executor is anything with execute(StepPlan) -> StepResult: the model runner itself in the
offline engine, or the client of the worker processes in the service stack.
"""

from __future__ import annotations

from typing import Protocol

from services.engine.request import Request
from services.engine.scheduler import Scheduler
from shared.config import EngineConfig
from shared.protocol import RequestDelta, StepPlan, StepResult
from shared.sampling_params import SamplingParams


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


def _check_capacity(config: EngineConfig, num_blocks: int) -> None:
    capacity = num_blocks * config.cache.block_size
    if capacity < config.model.max_model_len:
        raise ValueError(
            f"the KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than max_model_len="
            f"{config.model.max_model_len}; lower max_model_len or give the cache more memory"
        )


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, num_blocks: int, first_step_id: int = 0):
        _check_capacity(config, num_blocks)
        self.config = config
        self.executor = executor
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, first_step_id)
        self.last_num_tokens = 0  # tokens scheduled by the latest step
        self._last_plan: StepPlan | None = None

    def make_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None = None,
        priority: int = 0,
    ) -> Request:
        """Validate a request without admitting it (raises ValueError). output_token_ids: the
        tokens a resumed request had generated already; it continues after them."""
        m = self.config.model
        for what, ids in (("prompt", prompt_token_ids), ("output", output_token_ids or ())):
            bad = next((t for t in ids if not 0 <= t < m.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{what} token id {bad} is out of range for a vocabulary of {m.vocab_size}")
        return Request(
            req_id, prompt_token_ids, params, m.eos_token_ids, m.max_model_len,
            output_token_ids=output_token_ids, priority=priority,
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, req_ids: list[str]) -> list[RequestDelta]:
        return self.scheduler.abort(req_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestDelta]:
        plan = self.scheduler.schedule()
        self.last_num_tokens = plan.total_num_scheduled_tokens
        if not plan.num_scheduled_tokens and not plan.finished_req_ids:
            return []
        self._last_plan = plan
        result = self.executor.execute(plan)
        return self.scheduler.update(plan, result)

    def restart_workers(self, num_blocks: int) -> None:
        """Carry on over workers that start afresh with num_blocks KV blocks: every unfinished
        request is recomputed from its prompt and the tokens it has so far (ValueError, with
        nothing changed, when num_blocks cannot hold max_model_len)."""
        _check_capacity(self.config, num_blocks)
        self.scheduler.restart_workers(num_blocks)
        self._last_plan = None

    def fail_last_step(self) -> list[str]:
        """After the executor raised: abort the requests of that step (their blocks return to the
        pool, the worker drops them with the next plan) so every other request carries on.
        Returns the ids of the requests that failed."""
        if self._last_plan is None:
            return []
        failed = [d.req_id for d in self.scheduler.abort(list(self._last_plan.num_scheduled_tokens))]
        self._last_plan = None
        return failed
