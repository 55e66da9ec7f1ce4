"""Pipeline parallelism: which layers a stage holds, and what travels between stages.

Each stage holds a contiguous share of the decoder layers (the first also the embedding, the last
also the final norm and LM head) and only their KV cache. A step's activations (hidden states and
the residual stream) go from each rank to the same tensor-parallel rank of the next stage; the
last stage samples, answers the engine and sends each step's outcome (the sampled tokens and the
requests that failed) back to the earlier stages, which need the tokens as the next inputs.

The sends are asynchronous, so an earlier stage goes on to the engine's next plan while later
stages still compute; an earlier stage reads a step's outcome only when a plan touches one of the
requests that sampled in it (outcomes arrive in step order).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from shared.config import ParallelConfig
from shared.protocol import StepPlan

Intermediate = tuple[torch.Tensor, torch.Tensor]  # (hidden, residual) between stages
_ACTIVATIONS, _OUTCOME = 1, 2  # message tags: the two directions between a pair of ranks


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """The layers ``stage`` of ``stages`` holds: contiguous, as even as can be (earlier stages
    take the remainder; the last also runs the LM head)."""
    per, extra = divmod(num_layers, stages)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


class MissingLayer(nn.Module):
    """A module that another pipeline stage holds: no weights here, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on another pipeline stage")


def on_another_stage(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a module this stage does not hold."""
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return False
        if isinstance(module, MissingLayer):
            return True
    return False


class Outcome(msgspec.Struct, array_like=True):
    """What the last stage tells the earlier ones after a step."""

    step_id: int
    req_ids: list[str]  # requests that sampled a token, in row order
    tokens: list[int]
    failed: dict[str, str]


@dataclass
class _Pending:
    step_id: int
    req_ids: frozenset[str]  # the requests that sampled in the step


class StageLink:
    """A rank's links to its neighbouring stages (the same tensor-parallel rank in each)."""

    def __init__(self, parallel: ParallelConfig, device: torch.device):
        tp, stage = parallel.tensor_parallel_size, parallel.pp_rank
        self.first, self.last = stage == 0, stage == parallel.pipeline_parallel_size - 1
        self.prev = parallel.rank - tp if not self.first else None
        self.next = parallel.rank + tp if not self.last else None
        self.earlier = [parallel.rank - k * tp for k in range(1, stage + 1)]  # outcome readers (last stage)
        self.source = parallel.result_rank + parallel.rank % tp  # whose outcomes this rank reads
        self.device = device
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []  # buffers live until their send completes
        self.pending: deque[_Pending] = deque()
        self.wait_s = 0.0  # time blocked receiving from the neighbouring stages: the bubble, not compute

    def _recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        start = time.perf_counter()
        dist.recv(tensor, src, tag=tag)
        self.wait_s += time.perf_counter() - start

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]
        self.sends.append((dist.isend(tensor.contiguous(), dst, tag=tag), tensor))

    def send_activations(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        for tensor in (hidden, residual):
            self._isend(tensor, self.next, _ACTIVATIONS)

    def recv_activations(self, num_tokens: int, hidden_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        out = tuple(torch.empty(num_tokens, hidden_size, dtype=dtype, device=self.device) for _ in range(2))
        for tensor in out:
            self._recv(tensor, self.prev, _ACTIVATIONS)
        return out

    def send_outcome(self, outcome: Outcome) -> None:
        payload = torch.frombuffer(bytearray(msgspec.msgpack.encode(outcome)), dtype=torch.uint8).to(self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        for rank in self.earlier:
            self._isend(size, rank, _OUTCOME)
            self._isend(payload, rank, _OUTCOME)

    def _recv_outcome(self) -> Outcome:
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        self._recv(size, self.source, _OUTCOME)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._recv(payload, self.source, _OUTCOME)
        return msgspec.msgpack.decode(payload.cpu().numpy().tobytes(), type=Outcome)

    def expect(self, step_id: int, req_ids: list[str]) -> None:
        """An earlier stage ran a step in which these requests sample: its outcome will come."""
        if req_ids:
            self.pending.append(_Pending(step_id, frozenset(req_ids)))

    def outcomes_for(self, plan: StepPlan) -> list[Outcome]:
        """The outcomes an earlier stage must take in before running ``plan``: up to the last
        pending step whose requests the plan touches (all of them when it touches none: nothing)."""
        touched = {*plan.num_scheduled_tokens, *plan.finished_req_ids, *(n.req_id for n in plan.new_requests)}
        upto = max((i for i, p in enumerate(self.pending) if p.req_ids & touched), default=-1)
        return [self.take() for _ in range(upto + 1)]

    def take(self) -> Outcome:
        """The oldest pending step's outcome (waits for it)."""
        expected = self.pending.popleft()
        outcome = self._recv_outcome()
        if outcome.step_id != expected.step_id:
            raise RuntimeError(f"pipeline out of step: outcome of step {outcome.step_id}, "
                               f"expected {expected.step_id}")
        return outcome
