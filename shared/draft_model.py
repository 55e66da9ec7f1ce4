"""The draft model of speculative decoding (method draft_model): its config, checked against the
target's at startup so a mismatch fails before any request. Nothing here imports torch."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.config import EngineConfig, ModelConfig


def draft_model_config(config: EngineConfig, weights: bool = True) -> ModelConfig | None:
    """The draft's ModelConfig (None unless the method is draft_model; an EAGLE head's for eagle
    and eagle3, shared/eagle.py): the target's dtype and max_model_len. ValueError when the draft cannot serve this target: another vocabulary, fewer
    positions than the target's max_model_len, a pooling model or target, attention heads the
    tensor-parallel ranks cannot share, or a draft_tensor_parallel_size other than 1 or the
    target's. The draft is sharded like the target over each stage's tensor-parallel ranks (the
    default, as in vLLM), or with draft_tensor_parallel_size 1 runs whole on each of them (every
    rank computes the same logits either way, so they all draft and accept the same tokens); it
    runs on the last pipeline stage, where the sampled tokens it drafts from are. Beside an fp8
    KV cache the draft keeps its own in the model's dtype."""
    from shared.eagle import eagle_head_config

    spec = config.speculative
    if spec is None or not spec.model_drafts:
        return None
    if spec.method != "draft_model":
        return eagle_head_config(config, weights)
    tp = config.parallel.tensor_parallel_size
    if spec.draft_tensor_parallel_size not in (None, 1, tp):
        raise ValueError(f"speculative_config draft_tensor_parallel_size must be 1 (the draft whole on every rank) or "
                         f"tensor_parallel_size ({tp}), got {spec.draft_tensor_parallel_size}")
    tp = 1 if spec.draft_tensor_parallel_size == 1 else tp  # the ranks that share the draft's heads
    if config.model.pooler is not None:
        raise ValueError("speculative decoding needs a generating model, not a pooling one")
    target = config.model
    draft = speculative_model_config(config, weights)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model {spec.model!r} has a vocabulary of {draft.vocab_size} tokens, the target "
                         f"{target.vocab_size}: a draft model must share the target's tokenizer")
    if draft.max_model_len < target.max_model_len:
        raise ValueError(f"the draft model {spec.model!r} covers {draft.max_model_len} positions, fewer than the "
                         f"target's max_model_len {target.max_model_len}: lower --max-model-len")
    if draft.num_heads % tp or (draft.num_kv_heads % tp and tp % draft.num_kv_heads):
        raise ValueError(f"the draft model {spec.model!r} has {draft.num_heads} attention heads and "
                         f"{draft.num_kv_heads} KV heads, which tensor_parallel_size {tp} cannot share evenly")
    return dataclasses.replace(draft, max_model_len=target.max_model_len)


# A draft step's cost beyond reading its weights, as a fraction of a target decode step (its
# sampling and per-layer Python). Measured on CPU with smol135 and its 2-layer draft (weights
# ratio 0.26), drafting one token a step on random prompts: the draft took 0.29 of a plain decode
# step at one stream and 0.31 at four (a timer around DraftRunner.propose, benchmarks/spec_decode.py's runs).
DRAFT_STEP_OVERHEAD = 0.05


def speculative_model_config(config: EngineConfig, weights: bool) -> ModelConfig:
    """The ModelConfig of speculative_config's model (a draft or an EAGLE head), generating, in
    the target's dtype; a ValueError naming the model when it cannot be read."""
    from shared.config import ModelConfig

    spec = config.speculative
    try:
        return ModelConfig.from_pretrained(spec.model, dtype=config.model.dtype, revision=spec.revision,
                                           weights=weights, runner="generate")
    except ValueError as exc:
        raise ValueError(f"speculative_config model {spec.model!r}: {exc}") from None


def draft_cost(config: EngineConfig) -> float:
    """What drafting one token costs a request, as a fraction of a target decode step (0 unless
    a model drafts: draft_model, eagle, eagle3): speculative_config's draft_cost if given, else the weights the
    draft reads per token (its layers and its LM head, the target's vocabulary) over the
    target's, plus DRAFT_STEP_OVERHEAD. Decoding at small batches is bound by reading weights,
    so their ratio is what a draft forward costs against a target one."""
    spec = config.speculative
    if spec is None or not spec.model_drafts:
        return 0.0
    if spec.draft_cost is not None:
        return spec.draft_cost
    draft = draft_model_config(config, weights=False)
    return _weights_per_token(draft) / _weights_per_token(config.model) + DRAFT_STEP_OVERHEAD


def _weights_per_token(model: ModelConfig) -> int:
    """Weights a decode step reads per token: each layer's attention and gated MLP (the experts
    a token is routed to, for a mixture of experts), and the LM head (an EAGLE-3 head's over its
    draft vocabulary)."""
    hf, h = model.hf_config, model.hidden_size
    attention = h * model.head_dim * 2 * (model.num_heads + model.num_kv_heads)
    experts = hf.get("num_experts_per_tok") or 1
    mlp = 3 * h * (hf.get("moe_intermediate_size") or hf.get("intermediate_size") or 4 * h) * experts
    return model.num_layers * (attention + mlp) + (hf.get("draft_vocab_size") or model.vocab_size) * h
