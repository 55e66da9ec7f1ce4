"""KV cache capacity on CUDA: what gpu_memory_utilization of the device leaves after a profiling step.

Before the KV cache exists, the runner runs one dummy step as large as the scheduler can ever
send: max_num_batched_tokens tokens of fresh prompts (over a temporary KV cache just big enough
for them), then logits and a sampler pass for max_num_seqs rows with every sampling feature on.
The peak of torch-allocated memory during that step (weights + activations; the temporary cache
is subtracted) is what every later step needs besides the KV cache, so

    KV budget = total memory x gpu_memory_utilization - peak

and the pool gets budget // bytes per block blocks. On a device other processes already crowd,
the budget is also capped by what is actually free (less the activations still to come and a
small reserve for CUDA graphs), so the allocation cannot fail. CPU sizing (kv_cache_memory) does
not run this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from services.worker.distributed import pp_rank, pp_size
from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.kv_cache import allocate_kv_cache, cache_bytes
from services.worker.layers.attention_backend import AttentionBackend, CommonAttentionMetadata
from services.worker.layers.sampler import Sampler, SamplingMetadata, SamplingState
from services.worker.pipeline import Intermediate
from shared.config import EngineConfig
from shared.sampling_params import MAX_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

FREE_MEMORY_RESERVE = 1 << 30  # left free when free memory caps the budget: CUDA graphs, fragmentation

# Every per-row sampler tensor and the full-vocabulary sort: the sampler's worst case.
PROFILE_SAMPLING = SamplingParams(
    temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=0.5, logprobs=MAX_LOGPROBS,
)


@dataclass(frozen=True)
class MemoryProfile:
    """What the profiling step measured, in bytes."""

    total: int  # device memory
    utilization: float  # gpu_memory_utilization
    weights: int  # allocated before the step (weights, buffers)
    peak: int  # peak allocated during the step, weights included, temporary KV cache excluded
    free: int  # free device memory after the step, caches emptied
    kv_budget: int  # bytes the KV cache may take

    @property
    def activations(self) -> int:
        return max(0, self.peak - self.weights)


def kv_cache_budget(
    total: int, utilization: float, peak: int, free: int | None = None, activations: int = 0, reserve: int = 0
) -> int:
    """total x utilization - peak, never negative. With free given (the device's free memory after
    profiling), also at most free - activations - reserve, so the cache and later steps fit in
    what is actually left when other processes hold part of the device."""
    budget = int(total * utilization) - peak
    if free is not None:
        budget = min(budget, free - activations - reserve)
    return max(0, budget)


def profile_prompt_lengths(num_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Fresh prompts that fill one step's token budget: as few as possible, longest first, none
    longer than max_model_len and no more than max_num_seqs of them (the scheduler can send no more)."""
    total = min(num_tokens, max_num_seqs * max_model_len)
    full, rest = divmod(total, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def dummy_prefill_metadata(
    lengths: list[int], block_size: int, device: torch.device
) -> tuple[CommonAttentionMetadata, int]:
    """Attention metadata of fresh prompts laid out on consecutive blocks from block 0, and the
    number of blocks they take."""
    tables, slots, qsl, next_block = [], [], [0], 0
    for n in lengths:
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        slots.append(next_block * block_size + np.arange(n, dtype=np.int64))
        qsl.append(qsl[-1] + n)
        next_block += blocks
    common = CommonAttentionMetadata(
        query_start_loc=qsl,
        seq_lens=list(lengths),
        block_tables=tables,
        slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
        num_decodes=0,
        block_size=block_size,
        device=device,
    )
    return common, next_block


@torch.inference_mode()
def profile_step(
    model: nn.Module, backend: AttentionBackend, config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """Run the dummy step (works on any device); returns the bytes of its temporary KV cache."""
    s = config.scheduler
    lengths = profile_prompt_lengths(s.max_num_batched_tokens, s.max_num_seqs, config.model.max_model_len)
    common, num_blocks = dummy_prefill_metadata(lengths, config.cache.block_size, device)
    kv_caches = allocate_kv_cache(config, num_blocks, dtype, device)
    num_tokens = common.query_start_loc[-1]
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    with set_forward_context(ForwardContext(backend, backend.build(common), kv_caches)):
        if pp_rank() == 0:
            hidden = model(input_ids, positions)
        else:  # a later pipeline stage starts from the previous one's activations
            zeros = torch.zeros(num_tokens, config.model.hidden_size, dtype=dtype, device=device)
            aux = dict.fromkeys(model.aux_layers_received(), zeros)  # an EAGLE-3 head's states of earlier stages
            hidden = model(input_ids, positions, Intermediate(zeros, zeros, aux))
    if pp_rank() != pp_size() - 1:  # only the last stage computes logits and samples
        return cache_bytes(kv_caches)
    rows = min(s.max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden[torch.arange(rows, device=device) % num_tokens])
    del hidden
    states = [SamplingState.create(PROFILE_SAMPLING, [0], ()) for _ in range(rows)]
    # the dummy draws must not move the seeded RNG that real requests sample from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        Sampler()(logits, SamplingMetadata.build(states, logits.shape[-1], device))
    return cache_bytes(kv_caches)


def profile_cuda_memory(
    model: nn.Module, backend: AttentionBackend, config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> MemoryProfile:
    """Measure the profiling step on a CUDA device and derive the KV cache budget."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    temp_bytes = profile_step(model, backend, config, dtype, device)  # its tensors are freed on return
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - temp_bytes
    torch.cuda.empty_cache()  # hand the step's cached blocks back so the KV cache can take them
    free, total = torch.cuda.mem_get_info(device)
    utilization = config.cache.gpu_memory_utilization
    budget = kv_cache_budget(total, utilization, peak, free, max(0, peak - weights), FREE_MEMORY_RESERVE)
    profile = MemoryProfile(total, utilization, weights, peak, free, budget)
    if budget < kv_cache_budget(total, utilization, peak):
        log.warning("only %.2f GiB free on %s: the KV cache gets less than gpu_memory_utilization allows",
                    free / 2**30, device)
    log.info(
        "memory profile: %.2f GiB total x %.2f, weights %.2f GiB, activations %.2f GiB -> KV cache %.2f GiB",
        total / 2**30, utilization, weights / 2**30, profile.activations / 2**30, budget / 2**30,
    )
    return profile
