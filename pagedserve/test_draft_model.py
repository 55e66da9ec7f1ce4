"""A draft model for speculative-decoding tests and benchmarks: the first layers of a checkpoint.

Random-weight models of different seeds agree on almost nothing, so a draft that shares the
target's embeddings, first layers, final norm and head (as a distilled draft would share its
behaviour) is what gets a realistic mix of accepted and rejected proposals.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


def make_draft_model(target_dir: str | Path, out_dir: str | Path, num_layers: int) -> Path:
    """Write into out_dir (created) a copy of the checkpoint at target_dir (one safetensors file)
    keeping only its first num_layers decoder layers; the tokenizer and configs are copied."""
    from safetensors.torch import load_file, save_file

    target, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}")
    for path in target.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy(path, out / path.name)
    config["num_hidden_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    layer = re.compile(r"\.layers\.(\d+)\.")
    weights = load_file(str(target / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if (m := layer.search(k)) is None or int(m.group(1)) < num_layers}
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
