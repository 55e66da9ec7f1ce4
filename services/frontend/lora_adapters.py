"""The LoRA adapters one frontend serves by name: --lora-modules at startup, and (with runtime
updating allowed) those loaded and unloaded over HTTP. A request picks one by its `model`.

Each adapter is checked here (shared.lora.check_adapter: rank, target modules, shapes, a sound
safetensors header) before any request can name it, so a bad one gets a 400 and never reaches
a worker.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from shared.lora import LoRARequest, check_adapter
from shared.protocol import ModelInfo


class LoRAAdapters:
    def __init__(self, modules: tuple[tuple[str, str], ...] = ()):
        self.modules = modules  # loaded once the engine says LoRA is on (setup)
        self.adapters: dict[str, LoRARequest] = {}
        self.max_rank = 0  # the engine's max_lora_rank; 0: LoRA is off
        self.hf_config: dict[str, Any] = {}
        self._ids = itertools.count(1)

    def setup(self, info: ModelInfo, base_names: list[str]) -> None:
        """Learn the engine's LoRA settings and load --lora-modules (ValueError for a bad one)."""
        self.max_rank = info.max_lora_rank
        config = Path(info.model_path) / "config.json"
        self.hf_config = json.loads(config.read_text()) if config.is_file() else {}
        for name, path in self.modules:
            self.load(name, path, base_names)

    def load(self, name: str, path: str, base_names: list[str]) -> LoRARequest:
        if not self.max_rank:
            raise ValueError("LoRA is not enabled on this server's engine (--enable-lora)")
        if name in self.adapters or name in base_names:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        if not self.hf_config:
            raise ValueError("the model's config.json is not readable here, so adapters cannot be checked")
        info = check_adapter(path, self.hf_config, self.max_rank)
        lora = self.adapters[name] = LoRARequest(name, next(self._ids), str(info.path.resolve()))
        return lora

    def unload(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None

    def get(self, name: str) -> LoRARequest | None:
        return self.adapters.get(name)
