"""Seeded random-weight checkpoints of real architectures, for tests and demos without downloads.

make_test_model() writes a Hugging Face model directory: config.json and safetensors weights
(saved by transformers itself), generation_config.json, and a byte-level BPE tokenizer trained
on local text (the Python standard library's source) with a chat template that renders tools,
tool calls and tool results as Qwen's (ChatML, the default) or Llama 3.1's templates do (see
test_model_templates). The tokenizer covers exactly the model's vocabulary, so every id a random
model emits decodes.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pagedserve.test_model_templates import CHAT_FORMATS, END_OF_TURN, TEMPLATES
from pagedserve.test_model_templates import SPECIAL_TOKENS as TEMPLATE_TOKENS

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral", "qwen3_moe", "opt")
SIZES = ("tiny", "small", "smol135", "qwen2.5-1.5b")
SPECIAL_TOKENS = TEMPLATE_TOKENS["qwen"]
CHAT_TEMPLATE = TEMPLATES["qwen"]
_CORPUS_CHARS = 2_000_000  # enough text for ~25k merges; more vocabulary is filler


@dataclass(frozen=True)
class _Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position: int
    rope_theta: float
    init_range: float  # large for tiny/small so greedy outputs vary instead of repeating one token
    dtype: str
    tied: bool | None = None  # None: the architecture's tiny default (_TIED)


_SHAPES = {
    "tiny": _Shape(64, 2, 4, 2, 16, 128, 1024, 1024, 10000.0, 0.2, "float32"),
    "small": _Shape(256, 4, 8, 2, 32, 768, 4096, 2048, 10000.0, 0.2, "float32"),
    "smol135": _Shape(576, 30, 9, 3, 64, 1536, 49152, 8192, 100000.0, 0.02, "bfloat16", tied=True),
    "qwen2.5-1.5b": _Shape(1536, 28, 12, 2, 128, 8960, 151936, 32768, 1000000.0, 0.02, "bfloat16", tied=True),
}
# Tied and untied embeddings both get exercised by the tiny models.
_TIED = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "gemma": True, "mixtral": False,
         "qwen3_moe": True, "opt": True}


def make_test_model(
    out_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    *,
    config_overrides: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
    chat_format: str = "qwen",
    attention_scale: float = 1.0,
) -> Path:
    """Write a random-weight checkpoint of `arch` with `size`'s shapes into out_dir (created).

    arch: llama | mistral | qwen2 | qwen3 | gemma | mixtral | qwen3_moe | opt (the MoE ones with 4
    experts, top 2; qwen3_moe's last layer dense). size: tiny (unit tests), small, smol135
    (SmolLM2-135M's shapes) or qwen2.5-1.5b (Qwen2.5-1.5B's shapes, applied to the given arch).
    config_overrides: extra HF config fields (e.g. OPT's do_layer_norm_before); max_shard_size:
    save sharded safetensors with an index; chat_format: qwen | llama3, the chat template and its
    special tokens; attention_scale: a factor on every attention output projection (a small one
    makes each next token depend mostly on the current one, so greedy output soon loops: a
    repetitive workload for speculative decoding). The same arguments always give the same files.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS or size not in SIZES or chat_format not in CHAT_FORMATS:
        raise ValueError(f"arch must be one of {ARCHS}, size one of {SIZES} and chat_format one of {CHAT_FORMATS}, "
                         f"got {arch!r}, {size!r}, {chat_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = _SHAPES[size]
    tokenizer = _save_tokenizer(out, shape.vocab, shape.max_position, chat_format)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in TEMPLATE_TOKENS[chat_format]}
    config = _hf_config(arch, size, shape, ids["<|endoftext|>"])
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, shape.dtype))
        _perturb_norms_and_biases(model)
        _scale_attention_outputs(model, attention_scale)
    _save_quietly(model, out, max_shard_size)
    eos = [ids["<|endoftext|>"], *(ids[name] for name in END_OF_TURN[chat_format])]
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def _save_quietly(model, out: Path, max_shard_size: str | None) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _hf_config(arch: str, size: str, shape: _Shape, eot: int):
    from transformers import (
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OPTConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    tied = _TIED[arch] if shape.tied is None else shape.tied
    common = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "max_position_embeddings": shape.max_position,
        "tie_word_embeddings": tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }
    if arch == "opt":  # no GQA; OPT names its init scale init_std
        return OPTConfig(ffn_dim=shape.intermediate, init_std=shape.init_range, word_embed_proj_dim=shape.hidden,
                         dropout=0.0, **common)
    if arch == "qwen3" and size == "tiny":
        shape = replace(shape, head_dim=32)  # explicit head_dim != hidden / heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if arch == "llama" and size in ("tiny", "small"):
        rope = {"rope_type": "llama3", "rope_theta": shape.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    configs = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "gemma": GemmaConfig, "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig}
    cls = configs[arch]
    extra: dict[str, Any] = {"sliding_window": None} if arch in ("mistral", "mixtral") else {}
    if arch == "gemma":
        extra["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "mixtral":
        extra.update(num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3_moe":  # unnormalized top-k weights (Mixtral covers renormalized ones)
        extra.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.intermediate // 2,
                     decoder_sparse_step=1, mlp_only_layers=[shape.layers - 1], norm_topk_prob=False)
    if arch != "qwen2":  # Qwen2 derives head_dim from hidden / heads
        extra["head_dim"] = shape.head_dim
    return cls(
        intermediate_size=shape.intermediate,
        num_key_value_heads=shape.kv_heads,
        initializer_range=shape.init_range,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        **extra,
        **common,
    )


def _scale_attention_outputs(model, factor: float) -> None:
    if factor == 1.0:
        return
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".o_proj." in name or ".out_proj." in name:
                param.mul_(factor)


def _perturb_norms_and_biases(model) -> None:
    """HF initializes norm weights to one and biases to zero; make them random so loading them
    wrongly (or not at all) shows in the outputs."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)


def _save_tokenizer(out: Path, vocab_size: int, max_length: int, chat_format: str = "qwen"):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, TEMPLATE_TOKENS[chat_format])),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=TEMPLATES[chat_format],
        model_max_length=max_length,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    tokenizer.save_pretrained(out)
    return tokenizer


@functools.cache
def _tokenizer_json(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> str:
    """A byte-level BPE trained on local text, padded to exactly vocab_size ids (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    data = json.loads(tokenizer.to_str())
    # The text may support fewer merges than the vocabulary has ids. The rest become plain
    # vocabulary entries no merge produces (cheaper to load than ~100k added tokens); their
    # printable names decode as themselves.
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|extra_{i}|>"] = i
    return json.dumps(data)


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """Deterministic training text: the standard library's top-level modules, in name order."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= _CORPUS_CHARS:
            break
    if not texts:
        raise RuntimeError("no Python standard-library source found to train the test tokenizer on")
    return tuple(texts)
