"""Command-line flags for the engine and model settings, shared by every entry point.

Each flag also reads a PAGEDSERVE_* environment variable (what compose and Kubernetes set), so
`--max-num-seqs` defaults to $PAGEDSERVE_MAX_NUM_SEQS when that is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from shared.config import (
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

DEFAULT_ENGINE_INPUT = "tcp://127.0.0.1:5570"
DEFAULT_ENGINE_OUTPUT = "tcp://127.0.0.1:5571"
DEFAULT_WORKER_ADDR = "tcp://127.0.0.1:5572"


def _env(flag: str, default):
    value = os.environ.get("PAGEDSERVE_" + flag.lstrip("-").replace("-", "_").upper())
    if value is None:
        return default
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    return type(default)(value) if default is not None else value


def add_flag(parser: argparse.ArgumentParser, flag: str, default, help: str, kind: type | None = None) -> None:
    """A flag whose default comes from its PAGEDSERVE_* variable, else `default`."""
    if isinstance(default, bool):
        parser.add_argument(flag, default=_env(flag, default), action=argparse.BooleanOptionalAction, help=help)
    else:
        parser.add_argument(flag, default=_env(flag, default), type=kind or type(default), help=help)


def add_model_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        parser.add_argument("model", nargs="?", default=_env("--model", None), help="local directory or hub id")
    else:
        add_flag(parser, "--model", None, "local directory or hub id", kind=str)
    add_flag(parser, "--served-model-name", None, "name clients use in the `model` field", kind=str)
    add_flag(parser, "--dtype", None, "auto, float32, float16 or bfloat16 (default: float32 on CPU, auto on GPU)", kind=str)
    add_flag(parser, "--max-model-len", None, "longest prompt + output in tokens", kind=int)
    add_flag(parser, "--block-size", 16, "tokens per KV block")
    add_flag(parser, "--kv-cache-memory", 2 << 30, "bytes of KV cache on CPU")
    add_flag(parser, "--gpu-memory-utilization", 0.9, "fraction of GPU memory to use")
    add_flag(parser, "--num-gpu-blocks-override", None, "force the number of KV blocks", kind=int)
    add_flag(parser, "--enable-prefix-caching", True, "reuse KV blocks of shared prefixes")
    add_flag(parser, "--max-num-seqs", 128, "most requests running at once")
    add_flag(parser, "--max-num-batched-tokens", 2048, "token budget per step")
    add_flag(parser, "--scheduling-policy", "fcfs", "fcfs, or priority: lower priority values run first")
    add_flag(parser, "--max-num-queued-requests", 1024, "most requests waiting; past it the engine answers 503")
    add_flag(parser, "--max-queued-tokens", 1 << 20, "most tokens waiting; past it the engine answers 503")
    add_flag(parser, "--async-scheduling", False, "plan each step while the workers compute the previous one")
    add_flag(parser, "--tensor-parallel-size", 1, "worker ranks")
    add_flag(parser, "--enforce-eager", False, "run every step eagerly on GPU (no CUDA graphs for decode)")
    add_flag(parser, "--seed", 0, "random seed")


def _section(cls, args: argparse.Namespace, **values):
    """A config section whose fields come from the flags of the same names (values: the rest)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    return cls(**{name: getattr(args, name) for name in names}, **values)


def engine_config_from_args(args: argparse.Namespace, rank: int = 0, weights: bool = True) -> EngineConfig:
    if not args.model:
        raise ValueError("a model is required (--model, or PAGEDSERVE_MODEL)")
    model = ModelConfig.from_pretrained(
        args.model, dtype=args.dtype, max_model_len=args.max_model_len, served_name=args.served_model_name,
        weights=weights,
    )
    return EngineConfig(
        model=model,
        cache=_section(CacheConfig, args),
        scheduler=_section(SchedulerConfig, args, policy=args.scheduling_policy),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, rank=rank),
        compilation=CompilationConfig(enforce_eager=args.enforce_eager),
        seed=args.seed,
    )
