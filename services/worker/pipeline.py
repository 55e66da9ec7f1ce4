"""Pipeline parallelism: which layers a stage holds, and what travels between stages.

Each stage holds a contiguous share of the decoder layers (the first also the embedding, the last
also the final norm and LM head) and only their KV cache. A step's activations (hidden states,
the residual stream, and the hidden states entering the aux layers run so far, which an EAGLE-3
head on the last stage reads) go from each rank to the same tensor-parallel rank of the next stage,
after a header (Activations) that the receiver checks against the step it runs; the last stage
samples, answers the engine and sends each step's outcome (the sampled tokens and the requests that
failed) back to the earlier stages, which need the tokens as the next inputs.

The sends are asynchronous, so an earlier stage goes on to the engine's next plan while later
stages still compute; an earlier stage reads a step's outcome only when a plan touches one of the
requests that sampled in it (outcomes arrive in step order).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from shared.config import ParallelConfig
from shared.protocol import ReqId, StepPlan, TokenId

_ACTIVATIONS, _OUTCOME = 1, 2  # message tags: the two directions between a pair of ranks
_Message = TypeVar("_Message", bound=msgspec.Struct)
# A header or outcome is at most this long (an outcome: a step's sampled tokens and failures), so a
# size from a broken peer fails its step instead of allocating without bound.
MAX_MESSAGE_BYTES = 16 << 20


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


@dataclass(frozen=True)
class Intermediate:
    """What a stage hands the next for a step's T tokens, each tensor [T, hidden_size]."""

    hidden: torch.Tensor
    residual: torch.Tensor
    aux: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> the hidden states entering it


class Activations(msgspec.Struct, array_like=True):
    """The header of a step's activations: 2 + len(aux_layers) tensors [num_tokens, hidden_size]
    follow (hidden, residual, then the states entering each aux layer, ascending), none if failed."""

    step_id: int
    num_tokens: int
    aux_layers: list[int]
    failed: bool = False  # the sending stage failed the step


class Outcome(msgspec.Struct, array_like=True):
    """What the last stage tells the earlier ones after a step."""

    step_id: int
    req_ids: list[ReqId]  # requests that sampled a token, in row order
    tokens: list[TokenId]  # an id past 2**31 - 1 or below 0 fails the decode
    failed: dict[ReqId, str]


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

    def send_activations(self, step_id: int, out: Intermediate) -> None:
        layers = sorted(out.aux)
        self._send_message(Activations(step_id, len(out.hidden), layers), [self.next], _ACTIVATIONS)
        for tensor in (out.hidden, out.residual, *(out.aux[i] for i in layers)):
            self._isend(tensor, self.next, _ACTIVATIONS)

    def send_failure(self, step_id: int) -> None:
        """This stage failed the step: the next one fails it too, instead of waiting for activations."""
        self._send_message(Activations(step_id, 0, [], failed=True), [self.next], _ACTIVATIONS)

    def recv_activations(self, expected: Activations, hidden_size: int, dtype: torch.dtype) -> Intermediate:
        """The previous stage's activations for the step that ``expected`` describes; RuntimeError
        when that stage failed the step or sent another step, token count or set of aux layers."""
        header = self._recv_message(self.prev, _ACTIVATIONS, Activations)
        if header.failed:
            raise RuntimeError(f"the previous pipeline stage failed step {header.step_id}")
        if header != expected:
            raise RuntimeError(f"pipeline out of step: activations {header}, expected {expected}")
        out = [torch.empty(expected.num_tokens, hidden_size, dtype=dtype, device=self.device)
               for _ in range(2 + len(expected.aux_layers))]
        for tensor in out:
            self._recv(tensor, self.prev, _ACTIVATIONS)
        return Intermediate(out[0], out[1], dict(zip(expected.aux_layers, out[2:])))

    def send_outcome(self, outcome: Outcome) -> None:
        self._send_message(outcome, self.earlier, _OUTCOME)

    def _send_message(self, message: msgspec.Struct, ranks: list[int], tag: int) -> None:
        payload = torch.frombuffer(bytearray(msgspec.msgpack.encode(message)), dtype=torch.uint8).to(self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        for rank in ranks:
            self._isend(size, rank, tag)
            self._isend(payload, rank, tag)

    def _recv_message(self, src: int, tag: int, kind: type[_Message]) -> _Message:
        """One message of ``kind`` (msgspec checks its fields' types on decode)."""
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        self._recv(size, src, tag)
        n = int(size.item())
        if not 0 < n <= MAX_MESSAGE_BYTES:
            raise RuntimeError(f"pipeline message of {n} bytes (at most {MAX_MESSAGE_BYTES})")
        payload = torch.empty(n, dtype=torch.uint8, device=self.device)
        self._recv(payload, src, tag)
        return msgspec.msgpack.decode(payload.cpu().numpy().tobytes(), type=kind)

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
        outcome = self._recv_message(self.source, _OUTCOME, Outcome)
        if outcome.step_id != expected.step_id:
            raise RuntimeError(f"pipeline out of step: outcome of step {outcome.step_id}, "
                               f"expected {expected.step_id}")
        return outcome
