"""The `pagedserve` command: one subcommand per service, plus tools."""

from __future__ import annotations

import argparse
import sys


def _make_test_model(args: argparse.Namespace) -> int:
    from pagedserve.test_model import make_test_model

    path = make_test_model(args.out, arch=args.arch, size=args.size, seed=args.seed)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(out.prompt + out.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-test-model", help="write a seeded random-weight checkpoint of a real architecture")
    p.add_argument("out")
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2", "qwen3", "opt"], default="llama")
    p.add_argument("--size", choices=["tiny", "small", "smol135", "qwen2.5-1.5b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_test_model)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
