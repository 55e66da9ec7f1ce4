"""Pre-quantized test checkpoints: a random-weight checkpoint (pagedserve.test_model) quantized into a
documented format, since none can be downloaded here.

compressed-tensors int8 (llm-compressor's W8A16 "int-quantized" layout): every linear projection's
weight [N, K] becomes int8 round(W / s) with s = max|W[n]| / 127 per output row, saved with
weight_scale [N, 1]; config.json gets the quantization_config that names the scheme; embeddings,
norms and the LM head stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
                "out_proj")

COMPRESSED_TENSORS_INT8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": None,
        }
    },
}


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str = "compressed-tensors-int8") -> Path:
    """Copy the checkpoint at src to dst with its linear projections quantized in `scheme`."""
    import torch
    from safetensors.torch import load_file, save_file

    from services.worker.quant.int8 import quantize_per_channel

    if scheme != "compressed-tensors-int8":
        raise ValueError(f"scheme must be compressed-tensors-int8, got {scheme!r}")
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    for file in sorted(dst.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(file).items():
            module = name.rsplit(".", 2)
            if name.endswith(".weight") and len(module) == 3 and module[1] in _PROJECTIONS:
                q, scale = quantize_per_channel(tensor)
                tensors[name] = q
                tensors[name.removesuffix("weight") + "weight_scale"] = scale[:, None].to(torch.float32)
            else:
                tensors[name] = tensor
        save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = COMPRESSED_TENSORS_INT8
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
