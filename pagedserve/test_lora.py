"""Seeded random PEFT LoRA adapters for the test models (make_test_model), for tests and demos.

make_test_adapter() writes what PEFT's save_pretrained writes for a LoRA adapter:
adapter_config.json and adapter_model.safetensors with base_model.model.<module>.lora_A/B.weight
tensors. B is random (not PEFT's zero init), so an adapter changes the model's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.lora import CONFIG_FILE, LORA_MODULES, WEIGHTS_FILE, expected_shapes


def make_test_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    rank: int = 8,
    seed: int = 0,
    *,
    target_modules: tuple[str, ...] = LORA_MODULES,
    lora_alpha: float | None = None,
) -> Path:
    """Write a LoRA adapter of rank `rank` for the checkpoint in model_dir into out_dir (created),
    on target_modules of every decoder layer. lora_alpha defaults to 2 * rank (scaling 2). The
    same arguments always give the same files."""
    import torch
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    shapes = expected_shapes(hf)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    gen = torch.Generator().manual_seed(seed)
    for layer in range(hf["num_hidden_layers"]):
        for proj in target_modules:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_f, in_f = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.1
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank if lora_alpha is None else lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_test_adapters(model_dir: str | Path, count: int, seed: int = 0, out_dir: str | Path | None = None
                       ) -> list[Path]:
    """`count` adapters in out_dir/adapter-<i> (default: model_dir/lora), of ranks 8, 4, 16, 8, ...
    (seeds seed + i)."""
    root = Path(model_dir) / "lora" if out_dir is None else Path(out_dir)
    ranks = (8, 4, 16)
    return [make_test_adapter(model_dir, root / f"adapter-{i}", ranks[i % 3], seed + i) for i in range(count)]
