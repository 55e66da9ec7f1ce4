"""The model runner: weights, paged KV cache tensors, one batched forward and sampling per step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.input_batch import RequestTable
from services.worker.layers.attention import select_backend
from services.worker.layers.sampler import Sampler, SamplingMetadata
from services.worker.loader import build_model, resolve_dtype
from shared.config import EngineConfig
from shared.protocol import StepPlan, StepResult, TokenLogprobs

log = logging.getLogger(__name__)


def kv_block_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    m, tp = config.model, config.parallel.tensor_parallel_size
    kv_heads = max(1, m.num_kv_heads // tp)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * m.num_layers * config.cache.block_size * kv_heads * m.head_dim * itemsize


@dataclass
class StepStats:
    phase: str  # "prefill", "decode" or "mixed"
    num_reqs: int
    num_tokens: int
    forward_s: float
    sampling_s: float


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.model, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.dtype, self.device)
        self.backend = select_backend(self.device, self.dtype)
        self.sampler = Sampler()
        self.num_blocks = self._measure_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.table = RequestTable(config.cache.block_size, self.device)
        self.last_stats: StepStats | None = None
        log.info("model runner ready: %s on %s, %d KV blocks", self.dtype, self.device, self.num_blocks)

    def _measure_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = kv_block_bytes(self.config, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - cache.gpu_memory_utilization)
            return max(0, int(budget // per_block))
        # On CPU the budget is a ceiling: no more than every running sequence at full length needs.
        bs, m = cache.block_size, self.config.model
        most = self.config.scheduler.max_num_seqs * -(-m.max_model_len // bs)
        return min(most, int(cache.kv_cache_memory // per_block))

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        m, tp = self.config.model, self.config.parallel.tensor_parallel_size
        shape = (2, num_blocks, self.config.cache.block_size, max(1, m.num_kv_heads // tp), m.head_dim)
        # zeros, not empty: padded key positions are masked, but 0 * NaN garbage would still leak
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self.table.apply(plan)
        if not plan.num_scheduled_tokens:
            return StepResult(plan.step_id, [], [])
        start = time.perf_counter()
        inputs = self.table.prepare(plan)
        ctx = ForwardContext(self.backend, self.backend.build(inputs.attn), self.kv_caches)
        with set_forward_context(ctx):
            hidden = self.model(inputs.input_ids, inputs.positions)
            states = inputs.sampling_states
            logits = self.model.compute_logits(hidden[inputs.logits_indices]) if states else None
        self._sync()
        forward_done = time.perf_counter()
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        if states:
            meta = SamplingMetadata.build([s.sampling for s in states], logits.shape[-1], self.device)
            out = self.sampler(logits, meta)
            tokens = out.sampled_token_ids.tolist()
            logprobs = _logprob_lists(out, states)
        self.table.advance(plan, states, tokens)
        self.last_stats = StepStats(
            _phase(inputs.attn.num_decodes, inputs.attn.num_reqs),
            inputs.attn.num_reqs,
            len(inputs.input_ids),
            forward_done - start,
            time.perf_counter() - forward_done,
        )
        return StepResult(plan.step_id, [s.req_id for s in states], tokens, logprobs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _phase(num_decodes: int, num_reqs: int) -> str:
    return "decode" if num_decodes == num_reqs else "prefill" if num_decodes == 0 else "mixed"


def _logprob_lists(out, states) -> list[TokenLogprobs | None]:
    if out.logprobs is None:
        return [None] * len(states)
    ids, vals, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.sampled_ranks.tolist()
    result: list[TokenLogprobs | None] = []
    for i, state in enumerate(states):
        k = state.sampling.params.logprobs
        result.append(None if k is None else TokenLogprobs(ids[i][: k + 1], vals[i][: k + 1], ranks[i]))
    return result
