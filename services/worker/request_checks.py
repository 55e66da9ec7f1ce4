"""Checks on what a step plan says about one request, before the worker builds tensors from it.

The protocol checks shapes and signs on decode; what only the worker knows (its vocabulary, its
number of KV blocks, what it holds for a request) is checked here. An id or a count out of range
would index the KV cache or the embedding out of bounds (on CUDA a device-side assert takes the
whole process down) or make the step's tensors disagree in shape, failing every request of the
step. Each check raises ValueError naming what is wrong; the request table fails that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.protocol import NewRequestData


@dataclass(frozen=True)
class WorkerLimits:
    """What the worker measured or loaded: the ranges a plan's ids and counts must fit."""

    vocab_size: int
    num_blocks: int
    block_size: int
    max_model_len: int  # positions the rotary / position tables cover
    pooling: bool = False  # a pooling model: it takes pooling requests only, and they only it


def check_in_vocab(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} must be token ids in [0, {vocab_size})")


def check_block_ids(block_ids: list[int], num_blocks: int) -> None:
    if any(not 0 <= b < num_blocks for b in block_ids):
        raise ValueError(f"block ids must be in [0, {num_blocks})")


def check_new_request(new: NewRequestData, limits: WorkerLimits) -> None:
    vocab_size = limits.vocab_size
    check_in_vocab("prompt_token_ids", new.prompt_token_ids, vocab_size)
    check_in_vocab("output_token_ids", new.output_token_ids, vocab_size)
    if new.prompt_token_ids.size == 0:
        raise ValueError("prompt_token_ids must not be empty")
    check_block_ids(new.block_ids, limits.num_blocks)
    if (new.pooling is not None) != limits.pooling:
        raise ValueError("this worker's model pools" if limits.pooling else "this worker's model does not pool")
    num_tokens = new.prompt_token_ids.size + new.output_token_ids.size
    if not 0 <= new.num_computed_tokens < num_tokens:
        raise ValueError(f"num_computed_tokens must be in [0, {num_tokens}), got {new.num_computed_tokens}")
    params = new.sampling_params
    for name, ids in (("allowed_token_ids", params.allowed_token_ids or []),
                      ("bad_words_token_ids", [t for seq in params.bad_words_token_ids for t in seq])):
        check_in_vocab(name, np.asarray(ids, dtype=np.int64), vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k >= vocab_size:
            raise ValueError(f"{name} must be below the vocabulary size {vocab_size}, got {k}")


def check_proposals(proposed: np.ndarray | None, num_tokens: int, num_computed: int, limits: WorkerLimits) -> None:
    """Proposed tokens (speculative decoding) are token ids, verified right after the last token."""
    if proposed is None:
        return
    check_in_vocab("spec_token_ids", proposed, limits.vocab_size)
    if num_computed + 1 != num_tokens:
        raise ValueError(f"proposed tokens must follow the last token: {num_computed} of {num_tokens} computed")


def check_schedule(num_tokens: int, num_computed: int, num_blocks_held: int, n: int, limits: WorkerLimits) -> None:
    """n tokens scheduled after num_computed must exist, fit in the blocks the request holds and
    have positions below max_model_len."""
    end = num_computed + n
    if n < 1 or end > num_tokens:
        raise ValueError(f"cannot compute {n} tokens after {num_computed} of {num_tokens}")
    if end > num_blocks_held * limits.block_size:
        raise ValueError(f"{end} tokens do not fit in {num_blocks_held} blocks")
    if end > limits.max_model_len:
        raise ValueError(f"{end} tokens exceed max_model_len={limits.max_model_len}")
