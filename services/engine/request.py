"""Engine-side request state."""

from __future__ import annotations

import enum
import time

from shared.lora import LoRARequest
from shared.pooling import PoolingParams
from shared.processor.stop import StopStrings
from shared.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """One sequence: its tokens (prompt then outputs), progress through the KV cache, and status."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        arrival_time: float | None = None,
        output_token_ids: list[int] | None = None,
        priority: int = 0,
        stop_strings: StopStrings | None = None,
        pooling: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
    ):
        """output_token_ids: a resumption's tokens generated so far (recomputed with the prompt;
        they count against max_tokens and min_tokens). priority: lower is scheduled first under
        the priority policy. stop_strings: the check of the request's stop strings (None: it has
        none, or this engine has no tokenizer and the processor checks them). pooling: a pooling
        request, computed in one step and finished with its pooled vector (it generates nothing)."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        if pooling is not None and len(prompt_token_ids) > max_model_len:
            raise ValueError(f"input is {len(prompt_token_ids)} tokens long; this model's max_model_len is "
                             f"{max_model_len} (truncate_prompt_tokens truncates it)")
        if pooling is None and len(prompt_token_ids) >= max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_token_ids)} tokens long; this model's max_model_len is {max_model_len}, "
                "which must leave room for at least one generated token"
            )
        self.req_id = req_id
        self.token_ids = list(prompt_token_ids) + list(output_token_ids or ())  # the one copy: prompt, outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        room = max_model_len - self.num_prompt_tokens
        limit = sampling_params.max_tokens
        self.max_tokens = room if limit is None else min(limit, room)
        self.pooling = pooling
        if pooling is not None:  # its one "output" is the pooled vector
            self.max_tokens = 1
        if self.num_output_tokens >= self.max_tokens:
            raise ValueError(
                f"a resumption with {self.num_output_tokens} generated tokens has no room left "
                f"(at most {self.max_tokens} output tokens)"
            )
        self.priority = priority
        self.stop_strings = stop_strings
        self.lora_request = lora_request  # the adapter it runs with (None: the base model)
        self.adapter_passes = 0  # steps it waited for an adapter slot (services/engine/adapter_slots.py)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # when it first entered the running batch
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.stop_reason: int | None = None
        self.spec_token_ids: list[int] = []  # proposed tokens the step in flight verifies
        self.draft_token_ids: list[int] = []  # the workers' draft model's proposals after its last token
        self.num_drafting = 0  # tokens the workers propose after its latest sampling step (StepPlan.num_draft_tokens)
        self.spec_acceptance = (0.0, 0.0)  # proposals tested and accepted, earlier ones decayed
        # prompt_logprobs: gathered chunk by chunk, delivered with the first token (then None)
        # (a resumption delivered them with its first token already)
        wants = sampling_params.prompt_logprobs is not None and not output_token_ids
        self.prompt_logprobs: list | None = [] if wants else None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self, grammar_done: bool = False) -> RequestStatus | None:
        """The finish status after the last appended token, or None to keep going. grammar_done:
        its structured-outputs grammar completed with that token (nothing more can follow)."""
        params, n_out = self.sampling_params, self.num_output_tokens
        last = self.token_ids[-1]
        if grammar_done:
            return RequestStatus.FINISHED_STOPPED
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        # every token goes through the detokenizer (it applies min_tokens itself); the matched
        # string is the processor's to report, so stop_reason stays None here
        if self.stop_strings is not None and self.stop_strings.add(last):
            return RequestStatus.FINISHED_STOPPED
        if n_out >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
