"""Which waiting requests may start under the adapter-slot limit (--max-loras).

A step runs at most max_loras different LoRA adapters (the workers' device slots). A waiting
request whose adapter is not in the step when every slot is taken cannot start; it is passed
over, and the requests behind it that run the base model or an adapter already in the step
start (it does not block the queue). So that it is not passed over forever, once it has been
passed over in MAX_PASSES steps, the requests behind it that would keep an adapter busy no
longer start (those of the base model still do): the step's adapters drain, a slot frees, and
it starts first, ahead of the requests behind it.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.engine.request import Request

MAX_PASSES = 32  # steps a request may be passed over for an adapter slot before the others wait


class AdapterSlots:
    """One step's adapters: those of the running requests, then of each request started."""

    def __init__(self, max_loras: int, running: Iterable[Request]):
        self.max_loras = max_loras
        self.adapters = {r.lora_request for r in running if r.lora_request is not None}
        self.starving = False  # a request ahead was passed over MAX_PASSES times: adapters drain

    def admits(self, request: Request) -> bool:
        """Whether `request` may start in this step as far as adapter slots go (False: pass over it)."""
        lora = request.lora_request
        if lora is None:
            return True
        if not self.starving and (lora in self.adapters or len(self.adapters) < self.max_loras):
            return True
        if lora not in self.adapters:  # no slot for it: count the pass, it may stop the others
            request.adapter_passes += 1
            self.starving = self.starving or request.adapter_passes >= MAX_PASSES
        return False

    def started(self, request: Request) -> None:
        """`request` starts in this step: its adapter takes a slot."""
        request.adapter_passes = 0
        if request.lora_request is not None:
            self.adapters.add(request.lora_request)
