"""EAGLE draft heads for speculative-decoding tests and benchmarks, written in the real checkpoint
formats (shared/eagle.py) with safetensors, for a Llama-family target checkpoint.

kind "random": random weights, for output-equality tests (proposals mostly rejected).
kind "probe": a head whose drafts are known from the target's hidden states, so a test can tell
that they are wired right. Its layer adds nothing (zero output projections), so its output state
is its input state: EAGLE-1's is the target's last hidden state (fc selects it), whose logits
through the target's head are the target's own, so every draft repeats the latest token; EAGLE-3's
is its fc's selection of the second aux layer's input (aux layers [1, 0, 2]: the token embedding
at that position), read by an LM head equal to the target's embedding, so every draft is the
token whose embedding best matches that of the token before the latest.
kind "mimic" (EAGLE-1, a one-layer target whose final norm weight is one): fc passes the token
embedding and the layer is the target's own, so the head computes what the target computes one
position later (but for the first token, which its attention cannot see): most drafts match.
eagle_config and write_head_checkpoint write a head of given weights (benchmarks/train_eagle.py's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

KINDS = ("random", "probe", "mimic")
PROBE_AUX_LAYERS = [1, 0, 2]


def make_eagle_head(target_dir: str | Path, out_dir: str | Path, method: str = "eagle", kind: str = "random",
                    seed: int = 0, config_overrides: dict | None = None) -> Path:
    """Write into out_dir (created) an EAGLE (method "eagle") or EAGLE-3 ("eagle3") head for the
    checkpoint at target_dir; config_overrides: extra config.json fields (for bad heads)."""
    import torch
    from safetensors.torch import load_file

    if method not in ("eagle", "eagle3") or kind not in KINDS or (kind == "mimic" and method != "eagle"):
        raise ValueError(f"method must be eagle or eagle3 and kind one of {KINDS} (mimic: eagle), got {method}, {kind}")
    target = Path(target_dir)
    config = eagle_config(target, method, kind, config_overrides)
    weights = load_file(str(target / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    head = (_eagle(config, gen) if method == "eagle" else _eagle3(config, gen))
    if kind == "probe":
        _probe(head, config, weights, method)
    elif kind == "mimic":
        _mimic(head, config, weights)
    return write_head_checkpoint(target, out_dir, config, head)


def eagle_config(target_dir: str | Path, method: str = "eagle", kind: str = "random",
                 config_overrides: dict | None = None) -> dict:
    """A head's config.json for the checkpoint at target_dir: the target's, with one layer (and
    EAGLE-3's draft vocabulary and aux layers), then config_overrides."""
    config = json.loads((Path(target_dir) / "config.json").read_text())
    config["num_hidden_layers"] = 1
    if method == "eagle3":
        config["architectures"] = ["LlamaForCausalLMEagle3"]
        config["draft_vocab_size"] = config["vocab_size"] if kind == "probe" else config["vocab_size"] // 2
        if kind == "probe":
            config["eagle_aux_hidden_state_layer_ids"] = PROBE_AUX_LAYERS
    config.update(config_overrides or {})
    return config


def write_head_checkpoint(target_dir: str | Path, out_dir: str | Path, config: dict, tensors: dict) -> Path:
    """Write into out_dir (created) a head: config.json, model.safetensors of `tensors`, and the
    target's tokenizer files."""
    from safetensors.torch import save_file

    target, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (target / name).is_file():
            shutil.copy(target / name, out / name)
    return out


def _layer(config: dict, gen, prefix: str, attn_in: int) -> dict:
    import torch

    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    d = config.get("head_dim") or h // heads

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    return {
        f"{prefix}.self_attn.q_proj.weight": rand(heads * d, attn_in),
        f"{prefix}.self_attn.k_proj.weight": rand(kv * d, attn_in),
        f"{prefix}.self_attn.v_proj.weight": rand(kv * d, attn_in),
        f"{prefix}.self_attn.o_proj.weight": rand(h, heads * d),
        f"{prefix}.mlp.gate_proj.weight": rand(inter, h),
        f"{prefix}.mlp.up_proj.weight": rand(inter, h),
        f"{prefix}.mlp.down_proj.weight": rand(h, inter),
        f"{prefix}.post_attention_layernorm.weight": 1 + rand(h),
    }


def _eagle(config: dict, gen) -> dict:
    """EAGLE-1: fc, layers.0 without its input norm (as the published heads)."""
    import torch

    h = config["hidden_size"]
    return {"fc.weight": torch.randn(h, 2 * h, generator=gen) * 0.05, **_layer(config, gen, "layers.0", h)}


def _eagle3(config: dict, gen) -> dict:
    """EAGLE-3: fc over three aux states, midlayer (attention 2h wide), norm, a draft-vocabulary
    LM head with d2t (every other target token) and t2d."""
    import torch

    h, vocab, draft_vocab = config["hidden_size"], config["vocab_size"], config["draft_vocab_size"]
    step = vocab // draft_vocab
    d2t = torch.arange(draft_vocab) * (step - 1)  # draft token i is target token i * step
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.arange(draft_vocab) * step] = True
    return {
        "fc.weight": torch.randn(h, 3 * h, generator=gen) * 0.05,
        **_layer(config, gen, "midlayer", 2 * h),
        "midlayer.input_layernorm.weight": torch.ones(h),
        "midlayer.hidden_norm.weight": torch.ones(h),
        "norm.weight": torch.ones(h),
        "lm_head.weight": torch.randn(draft_vocab, h, generator=gen) * 0.05,
        "d2t": d2t.long(),
        "t2d": t2d,
    }


def _probe(head: dict, config: dict, target: dict, method: str) -> None:
    import torch

    h = config["hidden_size"]
    prefix = "layers.0" if method == "eagle" else "midlayer"
    head[f"{prefix}.self_attn.o_proj.weight"].zero_()
    head[f"{prefix}.mlp.down_proj.weight"].zero_()
    fc = torch.zeros_like(head["fc.weight"])
    fc[:, h : 2 * h] = torch.eye(h)  # EAGLE-1: the target's hidden state; EAGLE-3: the second aux state
    head["fc.weight"] = fc
    if method == "eagle3":
        head["lm_head.weight"] = target["model.embed_tokens.weight"].clone()
        head["d2t"] = torch.zeros(config["vocab_size"], dtype=torch.long)
        head["t2d"] = torch.ones(config["vocab_size"], dtype=torch.bool)


def _mimic(head: dict, config: dict, target: dict) -> None:
    import torch

    h = config["hidden_size"]
    fc = torch.zeros_like(head["fc.weight"])
    fc[:, :h] = torch.eye(h)  # the token embedding
    head["fc.weight"] = fc
    for name, tensor in target.items():
        if name.startswith("model.layers.0."):
            head[name.removeprefix("model.")] = tensor.clone()


def with_unit_final_norm(target_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the checkpoint at target_dir whose final norm weight is one (for a mimic head,
    which has no final norm: the target's logits then differ from its by a positive factor)."""
    import torch
    from safetensors.torch import load_file, save_file

    target, out = Path(target_dir), Path(out_dir)
    shutil.copytree(target, out, dirs_exist_ok=True)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.norm.weight"] = torch.ones_like(weights["model.norm.weight"])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
