"""Benchmark request sets, as vLLM's `bench` commands name them: random, sharegpt, prefix_repetition.

Random and prefix-sharing prompts are token ids (sent as a token-id `prompt`, which the server
does not re-tokenize, so input lengths are exact); ShareGPT prompts are the first human turn's
text, with the reply's token count (from a tokenizer) as the output length.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "sharegpt", "prefix_repetition")
# token ids drawn for random prompts avoid the first ids (special tokens in most vocabularies)
_FIRST_ID = 10


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens (for a text prompt: counted by the tokenizer when one is given, else 0)
    output_len: int


def add_dataset_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """The dataset flags (seed=False: the parser has --seed already)."""
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None, help="sharegpt: a ShareGPT-format JSON file")
    p.add_argument("--num-prompts", type=int, default=1000)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len*(1-r), len*(1+r)]")
    p.add_argument("--random-prefix-len", type=int, default=0, help="a fixed prefix shared by every random prompt")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override every ShareGPT output length")
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    p.add_argument("--prefix-repetition-output-len", type=int, default=128)


def length_range(length: int, ratio: float) -> tuple[int, int]:
    """vLLM's random lengths: uniform over [len*(1-r), len*(1+r)]."""
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(_FIRST_ID, vocab_size) for _ in range(n)]


def uniform_requests(num: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int,
                     seed: int, prefix_len: int = 0) -> list[SampleRequest]:
    """`num` prompts of random token ids, each after one shared random prefix of `prefix_len` ids, with
    input and output lengths drawn uniformly from the inclusive ranges."""
    rng = random.Random(seed)
    prefix = _ids(rng, prefix_len, vocab_size)
    out = []
    for _ in range(num):
        n_in, n_out = rng.randint(*input_range), rng.randint(*output_range)
        out.append(SampleRequest(prefix + _ids(rng, n_in, vocab_size), len(prefix) + n_in, n_out))
    return out


def random_requests(args: argparse.Namespace, vocab_size: int) -> list[SampleRequest]:
    ratio = args.random_range_ratio
    return uniform_requests(args.num_prompts, length_range(args.random_input_len, ratio),
                            length_range(args.random_output_len, ratio), vocab_size, args.seed,
                            args.random_prefix_len)


def prefix_repetition_requests(args: argparse.Namespace, vocab_size: int) -> list[SampleRequest]:
    """num_prefixes shared prefixes, each prompt one of them plus its own suffix (prefix caching)."""
    rng = random.Random(args.seed)
    if args.prefix_repetition_num_prefixes < 1:
        raise ValueError("--prefix-repetition-num-prefixes must be at least 1")
    prefixes = [_ids(rng, args.prefix_repetition_prefix_len, vocab_size)
                for _ in range(args.prefix_repetition_num_prefixes)]
    out = []
    for i in range(args.num_prompts):
        ids = prefixes[i % len(prefixes)] + _ids(rng, args.prefix_repetition_suffix_len, vocab_size)
        out.append(SampleRequest(ids, len(ids), args.prefix_repetition_output_len))
    rng.shuffle(out)
    return out


def sharegpt_requests(args: argparse.Namespace, tokenizer) -> list[SampleRequest]:
    """Conversations whose first two turns are a prompt and its reply, in the file's order after
    a seeded shuffle; the reply's token count is the output length (a tokenizer is needed
    unless --sharegpt-output-len is given)."""
    if not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json")
    path = Path(args.dataset_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")  # noqa: TRY004 (a bad file)
    if tokenizer is None and args.sharegpt_output_len is None:
        raise ValueError("ShareGPT output lengths need a tokenizer (--tokenizer) or --sharegpt-output-len")
    random.Random(args.seed).shuffle(data)
    out = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = (str(t.get("value", "")) if isinstance(t, dict) else "" for t in turns[:2])
        if not prompt:
            continue
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else 0
        output_len = args.sharegpt_output_len or len(tokenizer.encode(reply))
        if output_len < 1:
            continue
        out.append(SampleRequest(prompt, prompt_len, output_len))
        if len(out) == args.num_prompts:
            break
    if not out:
        raise ValueError(f"{args.dataset_path}: no conversation with a prompt and a reply")
    return out


def load_requests(args: argparse.Namespace, vocab_size: int, tokenizer=None) -> list[SampleRequest]:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.dataset_name == "sharegpt":
        return sharegpt_requests(args, tokenizer)
    if vocab_size <= _FIRST_ID:
        raise ValueError(f"a vocabulary of {vocab_size} is too small for random prompts")
    if args.dataset_name == "prefix_repetition":
        return prefix_repetition_requests(args, vocab_size)
    return random_requests(args, vocab_size)
