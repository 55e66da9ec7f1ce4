"""Pre-quantized test checkpoints: a random-weight checkpoint (pagedserve.test_model) quantized into a
documented format, since none can be downloaded here.

Schemes (SCHEMES): compressed-tensors int8 (llm-compressor's W8A16 "int-quantized" layout: every
linear projection's weight [N, K] becomes int8 round(W / s) with s = max|W[n]| / 127 per output row,
saved with weight_scale [N, 1]), the same with dynamic per-token int8 activations (W8A8), FP8
("float-quantized": float8_e4m3fn weights, s = max|W| / 448 per row with dynamic per-token FP8
activations, llm-compressor's FP8_DYNAMIC; or per tensor with a static input_scale, its FP8); GPTQ 4-bit (symmetric, groups of GROUP_SIZE columns), GPTQ 4-bit
act-order (desc_act, asymmetric), GPTQ 8-bit and AWQ 4-bit (pagedserve/test_quant_packed.py writes
their layouts). config.json gets the quantization_config that names the scheme; embeddings, norms
and the LM head stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
                "out_proj")
GROUP_SIZE = 32  # divides every test shape's projection inputs



def _compressed_tensors(fmt: str, weights: str, strategy: str, activations: dict | None) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": weights, "symmetric": True, "strategy": strategy, "dynamic": False},
            "input_activations": activations,
        }},
    }


def _per_token(kind: str) -> dict:
    return {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token", "dynamic": True}


_STATIC_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
# scheme -> (quantization_config, weight dtype "int" / "float", weight_scale strategy)
_COMPRESSED = {
    "compressed-tensors-int8": (_compressed_tensors("int-quantized", "int", "channel", None), "int", "channel"),
    "compressed-tensors-w8a8": (_compressed_tensors("int-quantized", "int", "channel", _per_token("int")), "int",
                                "channel"),
    "compressed-tensors-fp8": (_compressed_tensors("float-quantized", "float", "channel", _per_token("float")),
                               "float", "channel"),
    "compressed-tensors-fp8-tensor": (_compressed_tensors("float-quantized", "float", "tensor", _STATIC_FP8),
                                      "float", "tensor"),
}
COMPRESSED_TENSORS_INT8 = _COMPRESSED["compressed-tensors-int8"][0]


def _fp8(weight, strategy: str) -> dict:
    """FP8 e4m3 weight with scale amax / 448 per row (channel) or over the tensor (tensor; plus the
    static input_scale such checkpoints carry)."""
    import torch

    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(amax))
    out = {"weight": (w / (scale if strategy == "channel" else scale[0])).to(torch.float8_e4m3fn),
           "weight_scale": scale}
    return out if strategy == "channel" else {**out, "input_scale": torch.ones(1)}


# scheme -> (gptq bits, sym, act_order) or awq
_GPTQ = {"gptq": (4, True, False), "gptq-act-order": (4, False, True), "gptq-8bit": (8, True, False)}
SCHEMES = (*_COMPRESSED, *_GPTQ, "awq")


def _scheme(scheme: str, group_size: int):
    """(tensors of one projection weight keyed by the suffix replacing "weight", quantization_config)."""
    from pagedserve import test_quant_packed as packed
    from services.worker.quant.int8 import quantize_per_channel

    if scheme in _COMPRESSED:
        qconfig, weights, strategy = _COMPRESSED[scheme]
        if weights == "float":
            return lambda w: _fp8(w, strategy), qconfig

        def int8(weight):
            q, scale = quantize_per_channel(weight)
            return {"weight": q, "weight_scale": scale[:, None].float()}
        return int8, qconfig
    if scheme in _GPTQ:
        bits, sym, act_order = _GPTQ[scheme]
        return (lambda w: packed.gptq_tensors(w, bits, group_size, sym, act_order),
                packed.gptq_config(bits, group_size, sym, act_order))
    if scheme == "awq":
        return lambda w: packed.awq_tensors(w, group_size), packed.awq_config(group_size)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str = "compressed-tensors-int8",
                        group_size: int = GROUP_SIZE) -> Path:
    """Copy the checkpoint at src to dst with its linear projections quantized in `scheme`."""
    from safetensors.torch import load_file, save_file

    quantize, qconfig = _scheme(scheme, group_size)
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    for file in sorted(dst.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(file).items():
            module = name.rsplit(".", 2)
            if name.endswith(".weight") and len(module) == 3 and module[1] in _PROJECTIONS:
                prefix = name.removesuffix("weight")
                tensors.update({prefix + suffix: t.contiguous() for suffix, t in quantize(tensor).items()})
            else:
                tensors[name] = tensor
        save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
