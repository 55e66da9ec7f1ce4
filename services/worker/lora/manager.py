"""The worker's adapters: max_cpu_loras kept in host memory and max_loras in device slots, both
least-recently-used; each step gets its adapters into slots and a row mapping for the layers.

A request whose adapter cannot be loaded (a bad folder, more adapters in the step than slots)
fails alone; the rest of the step runs.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from services.worker.layers.linear import _Linear
from services.worker.lora.adapter import LoRAAdapter, load_adapter
from services.worker.lora.layer import LoRALayer, LoRAMapping
from shared.config import LoRAConfig
from shared.lora import LORA_MODULES, LoRARequest

log = logging.getLogger(__name__)

Scheduled = list[tuple[object, int]]  # (RequestState, tokens this step), in row order
NO_LORA = "this request names a LoRA adapter, but LoRA is not enabled on this worker"


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, hf_config: dict, dtype: torch.dtype):
        self.config, self.hf_config, self.dtype = config, hf_config, dtype
        self.packed: dict[str, tuple[str, object]] = dict(getattr(model, "packed_modules_mapping", {}))
        targets = {self.packed.get(m, (m, None))[0] for m in LORA_MODULES}
        self.layers: dict[str, LoRALayer] = {}
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(module, _Linear):
                shards = [s for m, (ours, s) in self.packed.items() if ours == leaf and m in LORA_MODULES] or [None]
                module.lora = self.layers[name] = LoRALayer(module, shards, config.max_lora_rank, config.max_loras,
                                                            dtype)
        if not self.layers:
            raise ValueError(f"LoRA is not supported for {type(model).__name__}: it has none of {LORA_MODULES}")
        self.cpu: OrderedDict[LoRARequest, LoRAAdapter] = OrderedDict()
        self.slots: OrderedDict[LoRARequest, int] = OrderedDict()
        self.num_loads = 0  # adapters read from disk

    def _adapter(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self.cpu.get(lora)
        if adapter is None:
            adapter = load_adapter(lora.lora_path, self.hf_config, self.config.max_lora_rank, self.packed, self.dtype)
            # by kind (self_attn.qkv_proj), not by layer: a pipeline stage holds only its own layers
            missing = sorted({_kind(n) for n in adapter.layers} - {_kind(n) for n in self.layers})
            if missing:
                raise ValueError(f"adapter {lora.lora_name!r} targets modules this model lacks: {missing[:3]}")
            self.num_loads += 1
            if len(self.cpu) >= self.config.cpu_capacity:
                self.cpu.popitem(last=False)
            self.cpu[lora] = adapter
        self.cpu.move_to_end(lora)
        return adapter

    def _activate(self, lora: LoRARequest, keep: set[LoRARequest]) -> None:
        """Put an adapter in a device slot (evicting the least recently used one not in `keep`)."""
        if lora in self.slots:
            self.slots.move_to_end(lora)
            return
        adapter = self._adapter(lora)
        used = set(self.slots.values())
        free = [s for s in range(self.config.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(k for k in self.slots if k not in keep)
            slot = self.slots.pop(victim)
        for name, layer in self.layers.items():
            layer.set_slot(slot, adapter.layers.get(name, []))
        self.slots[lora] = slot

    def prepare(self, scheduled: Scheduled, fail: Callable[[str, str], None],
                device: torch.device) -> tuple[Scheduled, LoRAMapping | None]:
        """Load the step's adapters into slots; fail the requests whose adapter cannot run. Returns
        the requests kept, in order, and the row mapping (None when no row uses an adapter)."""
        wanted = list(dict.fromkeys(s.lora_request for s, _ in scheduled if s.lora_request is not None))
        refused: dict[LoRARequest, str] = {}
        for lora in wanted[self.config.max_loras :]:
            refused[lora] = f"more than max_loras={self.config.max_loras} adapters in one step"
        keep = set(wanted[: self.config.max_loras])
        for lora in wanted[: self.config.max_loras]:
            try:
                self._activate(lora, keep)
            except ValueError as exc:
                refused[lora] = str(exc)
            except Exception as exc:  # still only this adapter's requests
                log.exception("loading LoRA adapter %r failed", lora.lora_name)
                refused[lora] = f"LoRA adapter {lora.lora_name!r} could not be loaded: {type(exc).__name__}: {exc}"
        return _mapping(scheduled, self.slots, refused, fail, device)


def prepare_adapters(manager: LoRAManager | None, scheduled: Scheduled, fail: Callable[[str, str], None],
                     device: torch.device) -> tuple[Scheduled, LoRAMapping | None]:
    """The step's LoRA mapping; without a manager, requests naming an adapter fail."""
    if manager is not None:
        return manager.prepare(scheduled, fail, device)
    if not any(s.lora_request is not None for s, _ in scheduled):
        return scheduled, None
    return _mapping(scheduled, {}, {s.lora_request: NO_LORA for s, _ in scheduled if s.lora_request}, fail, device)


def _mapping(scheduled: Scheduled, slots: dict[LoRARequest, int], refused: dict[LoRARequest, str],
             fail: Callable[[str, str], None], device: torch.device) -> tuple[Scheduled, LoRAMapping | None]:
    kept: Scheduled = []
    token_slots: list[int] = []
    for state, n in scheduled:
        lora = state.lora_request
        if lora in refused:
            fail(state.req_id, refused[lora])
            continue
        kept.append((state, n))
        token_slots += [-1 if lora is None else slots[lora]] * n
    return kept, LoRAMapping.from_slots(token_slots, device)


def _kind(module: str) -> str:
    """A layer's module without its decoder layer: model.layers.3.mlp.down_proj -> mlp.down_proj."""
    return re.sub(r"^.*\.layers\.\d+\.", "", module)
