"""EAGLE draft heads (speculative_config method "eagle" or "eagle3"): the head's config, checked
against the target's at startup so a head that cannot serve this target fails before any request.
Nothing here imports torch; the heads are services/worker/models/eagle.py, their runner
services/worker/eagle_runner.py.

Supported: a Llama-family target (LLAMA_FAMILY), the head whole on each tensor-parallel rank of the
last pipeline stage (an EAGLE-3 head's aux layers may lie on any stage: their states travel with
the stages' activations), with or without async scheduling, a head checkpoint (safetensors or
pytorch_model.bin) with the target's vocabulary:
- "eagle" (EAGLE-1/2): config.json of a Llama with the target's hidden_size; `fc.weight` [h, 2h]
  (`fc.bias` optional) over concat(token embedding, the target's last hidden state after its final
  norm); decoder layers `layers.N.*` (layer 0's input_layernorm may be absent); no final norm;
  the target's LM head, and its embedding unless the checkpoint has `embed_tokens.weight`.
- "eagle3" (EAGLE-3): `fc.weight` [h, 3 * target hidden] over the target's hidden states entering
  three of its layers (aux_layer_ids); one layer `midlayer.*` whose attention reads concat(normed
  embedding, normed hidden state), 2h wide; `norm.weight`; `lm_head.weight` [draft_vocab_size, h]
  with `d2t` (draft token i is target token i + d2t[i]); `t2d` is ignored; the embedding as above.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.config import EngineConfig, ModelConfig

EAGLE_METHODS = ("eagle", "eagle3")
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def eagle_head_config(config: EngineConfig, weights: bool = True) -> ModelConfig | None:
    """The head's ModelConfig (None unless the method is eagle or eagle3), with the target's dtype
    and max_model_len; ValueError when it cannot run here (see the module)."""
    from shared.draft_model import speculative_model_config

    spec = config.speculative
    if spec is None or spec.method not in EAGLE_METHODS:
        return None
    _check_setup(config)
    target = config.model
    head = speculative_model_config(config, weights)
    where = f"the {spec.method} head {spec.model!r}"
    if head.vocab_size != target.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {head.vocab_size} tokens, the target {target.vocab_size}")
    hf = head.hf_config
    if spec.method == "eagle" and head.hidden_size != target.hidden_size:
        raise ValueError(f"{where} has hidden_size {head.hidden_size}, the target {target.hidden_size}: "
                         "an EAGLE head reads the target's hidden states")
    if spec.method == "eagle3":
        width = hf.get("target_hidden_size") or head.hidden_size
        if width != target.hidden_size:
            raise ValueError(f"{where} reads hidden states of width {width} (its target_hidden_size or "
                             f"hidden_size), the target's are {target.hidden_size}")
        draft_vocab = hf.get("draft_vocab_size") or head.vocab_size
        if not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= target.vocab_size:
            raise ValueError(f"{where}: draft_vocab_size must be in [1, {target.vocab_size}], got {draft_vocab!r}")
        aux_layer_ids(hf, target.num_layers)
    return dataclasses.replace(head, max_model_len=target.max_model_len)


def _check_setup(config: EngineConfig) -> None:
    """What the EAGLE runner does not do yet, refused at startup."""
    method = config.speculative.method
    if config.model.architecture not in LLAMA_FAMILY:
        raise ValueError(f"speculative_config method {method!r} needs a Llama-family target ({', '.join(LLAMA_FAMILY)}),"
                         f" got {config.model.architecture}")
    if config.model.pooler is not None:
        raise ValueError("speculative decoding needs a generating model, not a pooling one")
    if config.speculative.draft_tensor_parallel_size not in (None, 1):
        raise ValueError(f"speculative_config draft_tensor_parallel_size must be 1 for method {method!r}")


def aux_layer_ids(head_hf: dict[str, Any], num_target_layers: int) -> tuple[int, int, int]:
    """The three target layers whose input hidden states an EAGLE-3 head reads: config.json's
    eagle_aux_hidden_state_layer_ids (at the top or in eagle_config), else (2, L // 2, L - 3) as
    vLLM defaults; ValueError unless they are three layers of the target."""
    nested = head_hf.get("eagle_config") if isinstance(head_hf.get("eagle_config"), dict) else {}
    ids = head_hf.get("eagle_aux_hidden_state_layer_ids") or nested.get("eagle_aux_hidden_state_layer_ids")
    n = num_target_layers
    if ids is None:
        ids = [2, n // 2, n - 3]
    if (not isinstance(ids, list) or len(ids) != 3
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in ids)):
        raise ValueError(f"an EAGLE-3 head reads the hidden states entering three of the target's {n} layers; "
                         f"got layers {ids} (set eagle_aux_hidden_state_layer_ids in the head's config.json)")
    return tuple(ids)
