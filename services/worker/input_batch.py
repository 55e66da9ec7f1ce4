"""The flattened inputs of one step, built from the request table's runnable requests.

Tokens are laid out request after request in the table's row order (decodes first); the token
ids, positions and KV slots are computed on the host and copied to the device once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from services.worker.layers.attention_backend import CommonAttentionMetadata
from services.worker.request_table import RequestState
from services.worker.transfer import tensor_to_device, to_device


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: CommonAttentionMetadata
    # [S + P] the last token of each request that samples this step; a request verifying k
    # proposed tokens (speculative decoding) has k + 1 rows: its last token, then each proposal
    logits_indices: torch.Tensor
    sampling_requests: list[RequestState]  # the S requests that sample, in row order
    # prompt_logprobs requests in a prefill chunk: (state, first row, its position, rows); row r
    # scores prompt token position + (r - first row) + 1
    prompt_rows: list[tuple[RequestState, int, int, int]] = field(default_factory=list)
    # pooling requests whose prompt this step completes: (state, first row, rows); they do not sample
    pooling_rows: list[tuple[RequestState, int, int]] = field(default_factory=list)
    requests: list[RequestState] = field(default_factory=list)  # every request of the step, in row order


def flatten(scheduled: list[tuple[RequestState, int]], block_size: int, device: torch.device) -> StepInputs:
    """The step's inputs for (request, tokens to compute) pairs, in that order (decodes first)."""
    bs = block_size
    ids, pos, slots, qsl, seq_lens, tables, logits_idx, samplers = [], [], [], [0], [], [], [], []
    prompt_rows, pooling_rows = [], []
    num_decodes = sum(1 for _, n in scheduled if n == 1)
    for state, n in scheduled:
        start = state.num_computed_tokens
        p = np.arange(start, start + n)
        table = np.asarray(state.block_ids, dtype=np.int64)
        proposed = state.spec_token_ids  # computed after the last token
        ids.append(state.token_ids[start : start + n] + proposed)
        pos.append(p)
        slots.append(table[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
        seq_lens.append(start + n)
        tables.append(state.block_ids)
        if state.pooling is not None:
            if start + n >= len(state.token_ids):
                pooling_rows.append((state, qsl[-2], n))
        elif start + n >= len(state.token_ids) + len(proposed):
            logits_idx.extend(range(qsl[-1] - 1 - len(proposed), qsl[-1]))
            samplers.append(state)
        scored = min(start + n, state.prompt_len - 1) - start  # positions that predict a prompt token
        if state.sampling.params.prompt_logprobs is not None and scored > 0:
            prompt_rows.append((state, qsl[-2], start, scored))
    flat_ids = [t for chunk in ids for t in chunk]
    # built on the host; on CUDA copied from pinned memory without blocking (see transfer.py)
    attn = CommonAttentionMetadata(
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_tables=tables,
        slot_mapping=to_device(torch.from_numpy(np.concatenate(slots)), device),
        num_decodes=num_decodes,
        block_size=bs,
        device=device,
    )
    return StepInputs(
        input_ids=tensor_to_device(flat_ids, torch.long, device),
        positions=to_device(torch.from_numpy(np.concatenate(pos)), device),
        attn=attn,
        logits_indices=tensor_to_device(logits_idx, torch.long, device),
        sampling_requests=samplers,
        prompt_rows=prompt_rows,
        pooling_rows=pooling_rows,
        requests=[state for state, _ in scheduled],
    )
