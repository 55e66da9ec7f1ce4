"""vLLM's `--config FILE.yaml`: each key is a flag's long name (with dashes or underscores), each
value its value; and, as in vLLM, flags on the command line may be spelled with underscores. The file's flags go before the command line's, so the command line wins (and a
model given bare, `serve MODEL`, wins over the file's `model`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def dashed_flags(argv: list[str]) -> list[str]:
    """vLLM's spelling rule: a flag may be written with underscores (--max_model_len 64,
    --max_model_len=64); values are left as they are."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def expand_config_file(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` (the subcommand's arguments) with each --config FILE replaced by the file's flags,
    placed first; parser.error for a file that cannot be read or is not a mapping."""
    files, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                parser.error("--config needs a YAML file")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    flags = [flag for path in files for flag in _file_flags(path, parser)]
    return flags + dashed_flags(rest)


def _file_flags(path: str, parser: argparse.ArgumentParser) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = set(parser._option_string_actions)
    out: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--config":
            parser.error(f"--config {path}: a config file cannot name another one")
        out += _as_args(flag, value, known)
    return out


def _as_args(flag: str, value: Any, known: set[str]) -> list[str]:
    """One key as command-line words: true -> --flag, false -> --no-flag (or nothing for a flag
    that is off unless given), a list -> --flag a b, a mapping -> --flag '{json}'."""
    if value is True:
        return [flag]
    if value is False:
        negated = "--no-" + flag[2:]
        return [negated] if negated in known else []
    if value is None:
        return []
    if isinstance(value, list):
        return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]
