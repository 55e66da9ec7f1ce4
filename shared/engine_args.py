"""Command-line flags for the engine and model settings, shared by every entry point.

Each flag also reads a PAGEDSERVE_* environment variable (what compose and Kubernetes set), so
`--max-num-seqs` defaults to $PAGEDSERVE_MAX_NUM_SEQS when that is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from shared.checkpoint import (
    CHECKPOINT_QUANTIZATIONS,
    QUANTIZATIONS,
)
from shared.checkpoint import (
    GENERATION_DEFAULTS as GENERATION_KEYS,  # generation_config key -> SamplingParams name
)
from shared.config import (
    ATTENTION_BACKENDS,
    KV_CACHE_DTYPES,
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shared.pooling import RUNNERS
from shared.speculative import SpeculativeConfig

DEFAULT_ENGINE_INPUT = "tcp://127.0.0.1:5570"
DEFAULT_ENGINE_OUTPUT = "tcp://127.0.0.1:5571"
DEFAULT_WORKER_ADDR = "tcp://127.0.0.1:5572"
DEFAULT_DIST_TIMEOUT_S = 600.0  # --dist-timeout: the ranks joining their group, and every collective after


def env_name(flag: str) -> str:
    """The environment variable a flag reads: --max-num-seqs -> PAGEDSERVE_MAX_NUM_SEQS."""
    return "PAGEDSERVE_" + flag.lstrip("-").replace("-", "_").upper()


_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                  "off": False}


def _convert(value: str, default, kind: type | None):
    if isinstance(default, bool):
        return _SWITCH_VALUES[value.strip().lower()]  # a KeyError: neither on nor off
    convert = kind or (type(default) if default is not None else str)
    return convert(value)


def _env(flag: str, default, kind: type | None = None, nargs: str | None = None):
    """ValueError naming the variable when its value does not convert (a switch takes 1/0,
    true/false, yes/no or on/off), so a service refuses to start rather than guess."""
    name = env_name(flag)
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        if nargs in ("+", "*"):  # a list flag: comma-separated in its variable
            return [_convert(item, None, kind) for item in value.split(",") if item]
        return _convert(value, default, kind)
    except (KeyError, ValueError):
        expected = "1/0, true/false, yes/no or on/off" if isinstance(default, bool) else f"a valid {flag}"
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    default,
    help: str,
    kind: type | None = None,
    *,
    aliases: tuple[str, ...] = (),
    nargs: str | None = None,
    choices: tuple | None = None,
    dest: str | None = None,
    env: bool = True,
) -> None:
    """A flag whose default comes from its PAGEDSERVE_* variable (unless env=False), else
    `default`. A bool default makes an on/off switch (--flag / --no-flag); nargs "+" or "*" a
    list (comma-separated in the variable); aliases are further spellings of the same flag."""
    value = _env(flag, default, kind, nargs) if env else default
    extra = {"dest": dest} if dest else {}
    if isinstance(default, bool):
        parser.add_argument(flag, *aliases, default=value, action=argparse.BooleanOptionalAction, help=help, **extra)
        return
    kind = kind or (type(default) if default is not None and nargs is None else str)
    parser.add_argument(flag, *aliases, default=value, type=kind, nargs=nargs, choices=choices, help=help, **extra)


def flag_names(add) -> tuple[str, ...]:
    """The names (dests) of the flags ``add(parser)`` defines, to forward them to a child."""
    probe = argparse.ArgumentParser(add_help=False)
    add(probe)
    return tuple(dict.fromkeys(a.dest for a in probe._actions))


def add_model_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """The model and engine flags; with model_positional, the model may also come first, bare
    (`serve MODEL`, as `vllm serve MODEL`), where it takes precedence over --model."""
    if model_positional:
        parser.add_argument("model_tag", nargs="?", default=None, help="local directory or hub id")
    add_flag(parser, "--model", None, "local directory or hub id", kind=str)
    add_flag(parser, "--served-model-name", None, "name(s) clients use in the `model` field (the first is the "
             "one responses carry; PAGEDSERVE_SERVED_MODEL_NAME comma-separated)", nargs="+")
    add_flag(parser, "--revision", None, "the hub revision (branch, tag or commit) of the model", kind=str)
    add_flag(parser, "--generation-config", "auto", "request defaults: auto (the model's generation_config.json), "
             "vllm (none: the engine's own defaults) or a folder holding a generation_config.json")
    add_flag(parser, "--override-generation-config", None, "JSON object of generation config values "
             "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over --generation-config's",
             kind=str)
    add_flag(parser, "--dtype", None, "auto, float32, float16 or bfloat16 (default: float32 on CPU, auto on GPU)", kind=str)
    add_flag(parser, "--quantization", None, "weight quantization: int8 (weight-only, per-channel, quantized at "
             "load); a checkpoint's own (compressed-tensors, gptq, awq) is detected from its config.json", kind=str,
             aliases=("-q",), choices=QUANTIZATIONS + CHECKPOINT_QUANTIZATIONS)
    add_flag(parser, "--max-model-len", None, "longest prompt + output in tokens", kind=int)
    add_flag(parser, "--runner", "auto", "generate, pooling (embeddings, scores; a decoder pools its last token) "
             "or auto (encoders pool, decoders generate)", choices=RUNNERS)
    add_flag(parser, "--block-size", 16, "tokens per KV block")
    add_flag(parser, "--kv-cache-memory", 2 << 30, "bytes of KV cache on CPU")
    add_flag(parser, "--gpu-memory-utilization", 0.9, "fraction of GPU memory to use")
    add_flag(parser, "--num-gpu-blocks-override", None, "force the number of KV blocks", kind=int)
    add_flag(parser, "--kv-cache-dtype", "auto", "KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3) or "
             "fp8_e5m2, scaled per layer by the checkpoint's k_scale/v_scale or by scales measured at startup",
             choices=KV_CACHE_DTYPES)
    add_flag(parser, "--enable-prefix-caching", True, "reuse KV blocks of shared prefixes")
    add_flag(parser, "--max-num-seqs", 128, "most requests running at once")
    add_flag(parser, "--max-num-batched-tokens", 2048, "token budget per step")
    add_flag(parser, "--scheduling-policy", "fcfs", "fcfs, or priority: lower priority values run first")
    add_flag(parser, "--max-num-queued-requests", 1024, "most requests waiting; past it the engine answers 503")
    add_flag(parser, "--max-queued-tokens", 1 << 20, "most tokens waiting; past it the engine answers 503")
    add_flag(parser, "--async-scheduling", True, "plan each step while the workers compute the previous one "
             "(on by default, as in vLLM; --no-async-scheduling plans each step after the last one's result)")
    add_flag(parser, "--tensor-parallel-size", 1, "worker ranks per pipeline stage", aliases=("-tp",))
    add_flag(parser, "--pipeline-parallel-size", 1, "pipeline stages, each holding a share of the layers",
             aliases=("-pp",))
    add_flag(parser, "--enforce-eager", False, "run every step eagerly on GPU (no CUDA graphs for decode)")
    add_flag(parser, "--attention-backend", None, "the kernel set: triton (default on CUDA) or torch (default on CPU)",
             choices=ATTENTION_BACKENDS)
    add_flag(parser, "--seed", 0, "random seed")
    add_flag(parser, "--speculative-config", None, 'speculative decoding, as vLLM\'s JSON: {"method": "ngram", '
             '"num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 1}, or {"method": "suffix", '
             '"suffix_decoding_max_tree_depth": 24, "suffix_decoding_max_cached_requests": 10000, ...}, or '
             '{"method": "draft_model", "model": DRAFT_DIR, "num_speculative_tokens": 3} (a smaller model, same '
             'vocabulary), or {"method": "eagle" or "eagle3", "model": HEAD_DIR, ...} (an EAGLE head)', kind=str)
    add_flag(parser, "--enable-lora", False, "serve LoRA adapters (--lora-modules, or loaded at run time)")
    add_flag(parser, "--max-lora-rank", 16, "highest rank of a LoRA adapter")
    add_flag(parser, "--max-loras", 1, "most different LoRA adapters in one batch (the workers' adapter slots)")
    add_flag(parser, "--max-cpu-loras", None, "most LoRA adapters kept loaded in host memory (default: --max-loras)",
             kind=int)
    add_flag(parser, "--disable-log-stats", False, "no periodic stats log lines from the engine")
    add_flag(parser, "--log-stats-interval", 10.0, "seconds between the engine's stats log lines")


def _section(cls, args: argparse.Namespace, **values):
    """A config section whose fields come from the flags of the same names (values: the rest)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    return cls(**{name: getattr(args, name) for name in names}, **values)


def engine_config_from_args(args: argparse.Namespace, rank: int = 0, weights: bool = True) -> EngineConfig:
    if not args.model:
        raise ValueError("a model is required (--model, or PAGEDSERVE_MODEL)")
    model = ModelConfig.from_pretrained(
        args.model, dtype=args.dtype, max_model_len=args.max_model_len, served_name=(args.served_model_name or [None])[0],
        revision=args.revision, weights=weights, quantization=args.quantization,
        runner=args.runner,
    )
    defaults = generation_defaults(model, args.generation_config, args.override_generation_config)
    model = dataclasses.replace(model, generation_defaults=defaults)
    return EngineConfig(
        model=model,
        cache=_section(CacheConfig, args),
        scheduler=_section(SchedulerConfig, args, policy=args.scheduling_policy),
        parallel=ParallelConfig(args.tensor_parallel_size, rank, args.pipeline_parallel_size),
        compilation=CompilationConfig(enforce_eager=args.enforce_eager, attention_backend=args.attention_backend),
        seed=args.seed,
        speculative=SpeculativeConfig.parse(args.speculative_config),
        lora=LoRAConfig.if_enabled(args.enable_lora, args.max_lora_rank, args.max_loras, args.max_cpu_loras),
    )


def generation_defaults(model: ModelConfig, source: str = "auto", override: str | None = None) -> dict[str, Any]:
    """The request defaults vLLM's --generation-config and --override-generation-config give:
    the model's own (auto), none (vllm) or a folder's generation_config.json, then the override's
    values on top. Keys are generation-config names (max_new_tokens), values SamplingParams'."""
    if source == "auto":
        defaults = dict(model.generation_defaults)
    elif source == "vllm":
        defaults = {}
    else:
        defaults = _mapped(_read_generation_config(source), f"{source}/generation_config.json", strict=False)
    if override:
        try:
            values = json.loads(override)
        except ValueError as exc:
            raise ValueError(f"--override-generation-config must be a JSON object: {exc}") from None
        defaults.update(_mapped(values, "--override-generation-config", strict=True))
    return defaults


def _read_generation_config(folder: str) -> dict[str, Any]:
    path = Path(folder).expanduser() / "generation_config.json"
    if not path.is_file():
        raise ValueError(f"--generation-config must be auto, vllm or a folder with a generation_config.json; "
                         f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _mapped(values: Any, where: str, strict: bool) -> dict[str, Any]:
    """Generation-config values as SamplingParams defaults, checked; with strict, a key pagedserve
    does not take from a generation config is an error rather than ignored."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(values).__name__}")  # noqa: TRY004 (a config error)
    unknown = sorted(set(values) - set(GENERATION_KEYS))
    if strict and unknown:
        raise ValueError(f"{where}: unsupported key(s) {unknown}; supported: {sorted(GENERATION_KEYS)}")
    out = {}
    for key, value in values.items():
        if key not in GENERATION_KEYS or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
        out[GENERATION_KEYS[key]] = value
    _check_sampling(out, where)
    return out


def _check_sampling(defaults: dict[str, Any], where: str) -> None:
    from shared.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
