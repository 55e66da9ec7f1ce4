"""The checkpoint a benchmark runs: --model, or a random-weight demo checkpoint of a real
architecture (pagedserve/test_model.py), built once and kept under --cache-dir."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "pagedserve" / "models"


def resolve_model(args: argparse.Namespace) -> Path:
    """The --model directory (or hub id), or the cached demo checkpoint of args.arch and
    args.demo_size under args.cache_dir, built on first use."""
    if args.model:
        from shared.checkpoint import resolve_model_path

        return resolve_model_path(args.model)
    target = args.cache_dir / f"{args.arch}-{args.demo_size}"
    if (target / "config.json").is_file():
        return target
    from pagedserve.test_model import make_test_model

    print(f"building {args.arch}-{args.demo_size} checkpoint in {target} ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never looks like a cached one.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        built = Path(make_test_model(staging / "model", args.arch, args.demo_size, seed=0))
        built.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
