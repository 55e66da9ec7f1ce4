"""Per-request worker state kept between steps, and the flattened inputs of one step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.worker.layers.attention import CommonAttentionMetadata
from services.worker.layers.sampler import SamplingState
from services.worker.structured_output import StructuredOutputs
from services.worker.transfer import tensor_to_device, to_device
from shared.protocol import NewRequestData, StepPlan


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt then outputs
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState
    prompt_len: int
    grammar: Any = None  # the xgrammar matcher of a request with structured_outputs


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: CommonAttentionMetadata
    logits_indices: torch.Tensor  # [S] last token of each request that samples this step
    sampling_states: list[RequestState]  # the S requests that sample, in row order
    # prompt_logprobs requests in a prefill chunk: (state, first row, its position, rows); row r
    # scores prompt token position + (r - first row) + 1
    prompt_rows: list[tuple[RequestState, int, int, int]] = field(default_factory=list)


class RequestTable:
    """The worker's view of every request in flight, updated from step-plan deltas."""

    def __init__(self, block_size: int, device: torch.device, structured: StructuredOutputs | None = None):
        self.block_size = block_size
        self.device = device
        self.structured = structured
        self.states: dict[str, RequestState] = {}
        self.failed: dict[str, str] = {}  # requests refused since the last take_failed()

    def apply(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids:
            self.states.pop(req_id, None)
        for new in plan.new_requests:
            self._add(new)
        for cached in plan.cached_requests:
            state = self.states[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _add(self, new: NewRequestData) -> None:
        old = self.states.get(new.req_id)  # resumed after preemption: keep its sampling RNG
        generator = old.sampling.generator if old is not None else None
        prompt, outputs = new.prompt_token_ids.tolist(), new.output_token_ids.tolist()
        grammar = None
        if new.sampling_params.structured_outputs is not None:
            try:
                if self.structured is None:
                    raise ValueError("this worker does not support structured outputs")
                grammar = self.structured.matcher(new.sampling_params.structured_outputs, outputs)
            except ValueError as exc:  # refuse this request alone; the engine fails it
                self.states.pop(new.req_id, None)
                self.failed[new.req_id] = str(exc)
                return
        sampling = SamplingState.create(
            new.sampling_params, prompt, tuple(new.eos_token_ids), self.device, output_token_ids=outputs
        )
        if generator is not None:
            sampling.generator = generator
        self.states[new.req_id] = RequestState(
            new.req_id,
            prompt + outputs,
            list(new.block_ids),
            new.num_computed_tokens,
            sampling,
            len(prompt),
            grammar,
        )

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flatten the scheduled tokens, decodes first, and compute slots and sampling rows."""
        # decodes first, longest context first; then prefill chunks, longest first (the torch
        # attention backend groups requests of similar length to limit padding)
        states = self.states
        order = sorted(
            ((r, n) for r, n in plan.num_scheduled_tokens.items() if r in states),  # not the refused
            key=lambda kv: (kv[1] != 1, -kv[1], -states[kv[0]].num_computed_tokens),
        )
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, tables, logits_idx, samplers = [], [], [], [0], [], [], [], []
        prompt_rows = []
        num_decodes = sum(1 for _, n in order if n == 1)
        for req_id, n in order:
            state = self.states[req_id]
            start = state.num_computed_tokens
            p = np.arange(start, start + n)
            table = np.asarray(state.block_ids, dtype=np.int64)
            ids.append(state.token_ids[start : start + n])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(state.block_ids)
            if start + n >= len(state.token_ids):
                logits_idx.append(qsl[-1] - 1)
                samplers.append(state)
            scored = min(start + n, state.prompt_len - 1) - start  # positions that predict a prompt token
            if state.sampling.params.prompt_logprobs is not None and scored > 0:
                prompt_rows.append((state, qsl[-2], start, scored))
        dev = self.device
        flat_ids = [t for chunk in ids for t in chunk]
        # built on the host; on CUDA copied from pinned memory without blocking (see transfer.py)
        attn = CommonAttentionMetadata(
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=tables,
            slot_mapping=to_device(torch.from_numpy(np.concatenate(slots)), dev),
            num_decodes=num_decodes,
            block_size=bs,
            device=dev,
        )
        return StepInputs(
            input_ids=tensor_to_device(flat_ids, torch.long, dev),
            positions=to_device(torch.from_numpy(np.concatenate(pos)), dev),
            attn=attn,
            logits_indices=tensor_to_device(logits_idx, torch.long, dev),
            sampling_states=samplers,
            prompt_rows=prompt_rows,
        )

    def take_failed(self) -> dict[str, str]:
        failed, self.failed = self.failed, {}
        return failed

    def advance(self, plan: StepPlan, sampled: list[RequestState], tokens: list[int]) -> None:
        for req_id, n in plan.num_scheduled_tokens.items():
            if req_id in self.states:
                self.states[req_id].num_computed_tokens += n
        for state, token in zip(sampled, tokens):
            state.token_ids.append(token)
            state.sampling.output_token_ids.append(token)
