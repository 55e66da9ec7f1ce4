"""The draft model of speculative decoding (method draft_model), run by the worker after each step.

The draft keeps its own paged KV cache under the target's block ids: one engine-side allocation,
a second set of (smaller) KV tensors. The engine says per request how many tokens to draft after
a step (StepPlan.num_draft_tokens); a request that drafts nothing costs no draft forward. One that
drafts first catches up: the draft computes the request's tokens from where its KV stopped being
valid (RequestState.num_draft_computed, 0 for a new or resent request whatever the target's
prefix-cache hit: writing the same tokens' KV into a shared block again is harmless) to its last
token. Then it drafts the tokens one at a time, with the request's own sampling parameters; the
engine schedules them with the request's next step, where the target verifies them. The KV of
drafted tokens sits past the request's real tokens and is written over when it next drafts.
Positions past the request's blocks (the token just sampled, the drafts) go to scratch blocks
after the shared ones, a few per row, so the token just sampled is computed again next time.
Drafts are only proposals: the target verifies each, so correctness never depends on them.
Under tensor parallelism the draft is sharded like the target (its logits gathered, so the same
on every rank), or with draft_tensor_parallel_size 1 whole on every rank (no collectives, the
whole draft's KV on each; the ranks compute the same logits as long as their kernels are
deterministic, as on CPU and on GPUs of one kind); from the same random state every rank then
draws the same drafts. Every rank verifies the engine's proposals (the result rank's drafts), so
only an unseeded random request's rejection sampling reads a rank's own q. Under pipeline
parallelism the draft runs whole on the last stage, which samples (the earlier stages build none).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import msgspec
import numpy as np
import torch

from services.worker.distributed import whole_model
from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.input_batch import StepInputs
from services.worker.kv_cache import allocate_kv_cache, kv_block_bytes
from services.worker.layers.attention import select_backend
from services.worker.layers.attention_backend import AttentionBackend, CommonAttentionMetadata
from services.worker.layers.sampler import (
    SamplingMetadata,
    SamplingState,
    process_logits,
    random_probs,
    random_sample,
)
from services.worker.loader import build_model
from services.worker.rejection_sampler import DraftDistributions, rejection_sampled
from services.worker.request_table import RequestState, RequestTable
from services.worker.transfer import tensor_to_device, to_device
from shared.config import EngineConfig, ModelConfig, ParallelConfig
from shared.draft_model import draft_model_config
from shared.protocol import StepPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Row:
    """One drafting request's part of a draft step: its tokens from `start` to `end` (exclusive)
    that the draft computes first, then its drafts."""

    state: RequestState
    start: int
    end: int
    table: list[int]  # its blocks, then its scratch blocks
    sampling: SamplingState  # a copy the drafts are appended to
    room: int  # drafts it may still make
    drafts: list[int] = dataclasses.field(default_factory=list)
    q: list[torch.Tensor] = dataclasses.field(default_factory=list)  # each draft's q (rejection-sampled rows)


class DraftRunner:
    """Loads the draft, sizes and holds its KV cache, and drafts after each step (see the module)."""

    shift: ClassVar[int] = 0  # at position p the draft reads token p + shift (an EAGLE head: 1)

    def __init__(self, config: EngineConfig, dtype: torch.dtype, device: torch.device, backend: AttentionBackend):
        model_config = draft_model_config(config)
        # the draft: every layer on this stage, sharded over its tensor-parallel ranks, or whole on
        # each of them with draft_tensor_parallel_size 1
        p, sharded = config.parallel, config.speculative.draft_tensor_parallel_size != 1
        tp = p.tensor_parallel_size if sharded else 1
        parallel = dataclasses.replace(p, tensor_parallel_size=tp, rank=p.rank % tp, pipeline_parallel_size=1)
        self._setup(config, model_config, parallel, dtype, device, backend)
        with whole_model(sharded):
            self.model = build_model(model_config, dtype, device)
        log.info("draft model %s: %d layers, %d tokens drafted per step", model_config.path,
                 model_config.num_layers, self.k)

    def _setup(self, config: EngineConfig, model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
               device: torch.device, backend: AttentionBackend) -> None:
        """The draft's own config, attention backend, KV sizes and scratch blocks."""
        # the draft's KV is in the model's dtype, also beside a target's fp8 cache (and then read
        # by a backend of its own, without the target's fp8 scaling)
        cache = dataclasses.replace(config.cache, kv_cache_dtype="auto")
        self.config = dataclasses.replace(config, model=model_config, cache=cache, parallel=parallel,
                                          speculative=None, lora=None)
        self.k = config.speculative.num_speculative_tokens
        if config.cache.kv_cache_dtype != "auto":
            backend = select_backend(device, dtype, config.compilation.attention_backend)
        self.dtype, self.device, self.backend = dtype, device, backend
        bs = config.cache.block_size
        self.scratch_per_row = -(-self.k // bs) + 1  # covers k positions past a row's blocks
        self.num_scratch = config.scheduler.max_num_seqs * self.scratch_per_row
        self.block_bytes = kv_block_bytes(self.config, dtype)  # beside each target block
        self.scratch_bytes = self.num_scratch * self.block_bytes
        self.kv_caches: list[torch.Tensor] = []
        self.distributions = DraftDistributions()  # q of the latest drafts, for the verifying step
        self.num_forwards = 0  # draft forward passes run (catch-ups and drafting steps)

    @classmethod
    def create(cls, config: EngineConfig, dtype: torch.dtype, device: torch.device,
               backend: AttentionBackend) -> DraftRunner | None:
        """A DraftRunner when the engine speculates with a draft model and this rank is on the
        last pipeline stage (which samples, so it holds the tokens to draft from), else None."""
        spec, p = config.speculative, config.parallel
        if spec is None or spec.method != "draft_model" or p.pp_rank != p.pipeline_parallel_size - 1:
            return None
        return cls(config, dtype, device, backend)

    def release(self, req_id: str) -> None:
        """A request left the worker's table (a draft model keeps nothing per request)."""

    def reset(self) -> None:
        """Every request left the worker's table."""

    def allocate(self, num_blocks: int) -> None:
        """The draft's KV: the target's num_blocks block ids, then the scratch blocks."""
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(self.config, num_blocks + self.num_scratch, self.dtype, self.device)

    @torch.inference_mode()
    def propose(self, plan: StepPlan, table: RequestTable, samplers: set[str], inputs: StepInputs,
                hidden: torch.Tensor) -> dict[str, np.ndarray]:
        """Draft plan.num_draft_tokens tokens for each of the requests in `samplers` (those that
        sampled this step, their tokens appended). Call before the table advances; inputs and
        hidden: the step's and the target's output (an EAGLE head drafts from them). Drafts are
        only proposals: if drafting fails the step goes on without them (the target verifies
        every proposal, so a draft KV left stale costs acceptance, never correctness)."""
        self.distributions.latest = {}
        try:
            return self._propose(plan, table, samplers, inputs, hidden)
        except Exception:
            log.exception("the draft model failed; this step proposes nothing")
            self.distributions.latest = {}
            return {}

    def _propose(self, plan: StepPlan, table: RequestTable, samplers: set[str], inputs: StepInputs,
                 hidden: torch.Tensor) -> dict[str, np.ndarray]:
        rows = self._rows(plan, table, samplers)
        if not rows:
            return {}
        self._catch_up(rows)
        hidden = self._forward(rows, [(r.start, r.end) for r in rows])
        last = np.cumsum([r.end - r.start for r in rows]) - 1
        hidden = hidden[torch.as_tensor(last, device=self.device)]
        live = list(range(len(rows)))  # every row has room for a draft (_rows)
        while True:
            self._draft([rows[i] for i in live], self.model.compute_logits(hidden))
            live = [i for i in live if rows[i].room > 0]
            if not live:
                break
            fed = [rows[i] for i in live]  # each row's latest draft, at the position after its tokens
            hidden = self._forward(fed, [(r.end + len(r.drafts) - 1, r.end + len(r.drafts)) for r in fed])
        for row in rows:  # the last token's position may be a scratch block's: it is computed again
            row.state.num_draft_computed = row.end - 1
        return self._proposals(rows)

    def _proposals(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        """The rows' drafts, their q kept for the verifying step."""
        self.distributions.latest = {r.state.req_id: (r.drafts, torch.stack(r.q)) for r in rows if r.q}
        return {r.state.req_id: np.asarray(r.drafts, dtype=np.int32) for r in rows if r.drafts}

    def _catch_up(self, rows: list[_Row]) -> None:
        """Compute the rows' earlier tokens in forwards of at most the step's token budget, the
        longest row first, until what is left fits one forward: a long prompt's first draft never
        runs as one forward over the whole prompt."""
        budget = self.config.scheduler.max_num_batched_tokens
        while sum(r.end - r.start for r in rows) > budget:
            row = max(rows, key=lambda r: r.end - r.start)
            if row.end - row.start == 1:
                return
            hi = min(row.end - 1, row.start + budget)
            self._forward([row], [(row.start, hi)])
            row.start = hi

    def _rows(self, plan: StepPlan, table: RequestTable, samplers: set[str]) -> list[_Row]:
        """One row per request that drafts: its tokens the draft has not computed, and its room."""
        rows = []
        max_len = self.config.model.max_model_len
        for req_id, n in plan.num_draft_tokens.items():
            state = table.states.get(req_id)
            if state is None or req_id not in samplers or state.pooling is not None:
                continue  # failed this step, did not sample, or nothing to draft for
            end = len(state.token_ids)
            room = min(n, self.k, max_len - end)  # a draft's position stays below max_model_len
            if room <= 0:
                continue
            start = min(state.num_draft_computed, end - 1)
            blocks = state.block_ids + self._scratch(len(rows))
            rows.append(_Row(state, start, end, blocks, _drafting(state.sampling), room))
        return rows

    def _scratch(self, index: int) -> list[int]:
        first = self.num_blocks + index * self.scratch_per_row
        return list(range(first, first + self.scratch_per_row))

    def _forward(self, rows: list[_Row], spans: list[tuple[int, int]], hidden: torch.Tensor | None = None):
        """The draft's output for rows' tokens at positions [lo, hi), one span per row (single-token
        spans are ordered first, as the backends expect); hidden: an EAGLE head's input states,
        one per position, laid out as the spans."""
        lengths = [hi - lo for lo, hi in spans]
        order = sorted(range(len(rows)), key=lambda i: lengths[i] != 1)
        if order != list(range(len(rows))):
            index = _reordered(order, lengths, self.device)
            out = self._forward([rows[i] for i in order], [spans[i] for i in order],
                                None if hidden is None else hidden[index])
            back = torch.empty_like(index)
            back[index] = torch.arange(len(index), device=self.device)
            return tuple(t[back] for t in out) if isinstance(out, tuple) else out[back]
        self.num_forwards += 1
        bs = self.config.cache.block_size
        ids, pos, slots, qsl = [], [], [], [0]
        for row, (lo, hi) in zip(rows, spans):
            p = np.arange(lo, hi)
            ids.extend(row.sampling.token_ids[lo + self.shift : hi + self.shift])
            pos.append(p)
            slots.append(np.asarray(row.table, dtype=np.int64)[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + hi - lo)
        common = CommonAttentionMetadata(
            query_start_loc=qsl,
            seq_lens=[hi for _, hi in spans],
            block_tables=[r.table for r in rows],
            slot_mapping=to_device(torch.from_numpy(np.concatenate(slots)), self.device),
            num_decodes=sum(1 for n in lengths if n == 1),
            block_size=bs,
            device=self.device,
        )
        ctx = ForwardContext(self.backend, self.backend.build(common), self.kv_caches)
        with set_forward_context(ctx):
            positions = to_device(torch.from_numpy(np.concatenate(pos)), self.device)
            input_ids = tensor_to_device(ids, torch.long, self.device)
            return self.model(input_ids, positions) if hidden is None else self.model(input_ids, positions, hidden)

    def _draft(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """One draft token per row, drawn from the row's processed distribution q as the target
        would sample (penalties, min_tokens and seeds see the drafts before it; a seeded row uses
        the noise the target will use at that position). q is kept for rejection-sampled rows; a
        row with nothing to sample stops drafting."""
        meta = SamplingMetadata.build([r.sampling for r in rows], logits.shape[-1], self.device)
        logits = process_logits(logits.float(), meta)
        best, tokens = logits.max(dim=-1)
        usable = best.isfinite().tolist()
        if not meta.all_greedy:
            probs = random_probs(logits, meta)
            keep = [i for i, r in enumerate(rows) if rejection_sampled(r.sampling.params)]
            q = probs[keep] if keep else None  # a copy: indexed by a list
            drawn = random_sample(probs, meta.seeds)
            tokens = drawn if meta.all_random else torch.where(meta.greedy_mask, tokens, drawn)
            for i, qi in zip(keep, q if q is not None else []):
                rows[i].q.append(qi)
        for row, token, ok in zip(rows, tokens.tolist(), usable):
            if not ok:
                row.room = 0
                del row.q[len(row.drafts):]
                continue
            row.sampling.append(token)
            row.drafts.append(token)
            row.room -= 1


def _drafting(s: SamplingState) -> SamplingState:
    """A copy of a request's sampling state for its drafts to be appended to (without logprobs)."""
    params = s.params if s.params.logprobs is None else msgspec.structs.replace(s.params, logprobs=None)
    return dataclasses.replace(s, params=params, token_ids=list(s.token_ids))  # keeps its allowed_token_ids mask


def _reordered(order: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """Where each position of the spans laid out in `order` sits in their original layout."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])
    return torch.as_tensor(index, device=device)
