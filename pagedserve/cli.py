"""The `pagedserve` command: one subcommand per service, plus tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pagedserve import lifeline
from pagedserve.bench.cli import BENCH_HELP, add_bench_parser


def _make_test_model(args: argparse.Namespace) -> int:
    from pagedserve.test_model import make_test_model

    path = make_test_model(args.out, arch=args.arch, size=args.size, seed=args.seed, chat_format=args.chat_format,
                           attention_scale=args.attention_scale)
    print(path)
    if args.lora_adapters:
        from pagedserve.test_lora import make_test_adapters

        for adapter in make_test_adapters(path, args.lora_adapters, seed=args.seed):
            print(adapter)
    if args.quantize:
        from pagedserve.test_quant_model import quantize_checkpoint

        print(quantize_checkpoint(path, f"{str(path).rstrip('/')}-{args.quantize}", args.quantize))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from shared.auth import generate_keys

    for path in generate_keys(args.dir):
        print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(out.prompt + out.outputs[0].text)
    return 0


def _service(module: str):
    """A subcommand backed by a module with add_arguments(parser) and run(args); imported lazily so
    the frontend never imports torch and the engine never imports the worker."""

    def add(sub, name: str, help: str) -> None:
        import importlib

        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    return add


_SERVICES = {
    "serve": ("pagedserve.serve", "run the whole stack: engine, workers and frontends"),
    "engine": ("services.engine.service", "run the engine (scheduler and KV cache manager)"),
    "worker": ("services.worker.service", "run one worker rank (model runner)"),
    "frontend": ("services.frontend.server", "run one OpenAI-compatible HTTP frontend"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in _SERVICES.items():
        if name == command:
            _service(module)(sub, name, help)
        else:
            sub.add_parser(name, help=help, add_help=False)

    # names only: torch loads when a model is made
    from pagedserve.test_model import ARCHS, CHAT_FORMATS, SIZES
    from pagedserve.test_quant_model import SCHEMES

    p = sub.add_parser("make-test-model", help="write a seeded random-weight checkpoint of a real architecture")
    p.add_argument("out")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-scale", type=float, default=1.0,
                   help="factor on the attention output projections (e.g. 0.05: greedy output loops)")
    p.add_argument("--chat-format", choices=CHAT_FORMATS, default="qwen",
                   help="the chat template's tool and reasoning markup: qwen (hermes) or llama3 (Llama 3.1 JSON)")
    p.add_argument("--lora-adapters", type=int, default=0,
                   help="also write this many seeded PEFT LoRA adapters, into OUT/lora/adapter-<i>")
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="also write OUT-<scheme>: the checkpoint quantized in that documented format")
    p.set_defaults(func=_make_test_model)

    p = sub.add_parser("keys", help="write CURVE keypairs for the engine, frontends and workers into DIR")
    p.add_argument("dir")
    p.set_defaults(func=_keys)

    if command == "bench":
        add_bench_parser(sub)
    else:
        sub.add_parser("bench", help=BENCH_HELP, add_help=False)

    p = sub.add_parser("generate", help="generate offline from one or more prompts")
    p.add_argument("model")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(func=_generate)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=os.environ.get("PAGEDSERVE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:  # a PAGEDSERVE_* variable that does not convert fails while the flags are built
        parser = build_parser(argv[0] if argv else None)
        if argv and argv[0] == "serve":  # vLLM's --config FILE.yaml: the file's flags, then the command line's
            from pagedserve.entrypoints.config_file import expand_config_file

            argv = ["serve", *expand_config_file(argv[1:], _subparser(parser, "serve"))]
        args = parser.parse_args(argv)
        lifeline.watch()  # a child of `pagedserve serve` ends with it
        return args.func(args)
    except ValueError as exc:
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
