"""What one generation request adds to the frontend's metrics (see ``metrics`` for the series).

A Generation drives it: ``start`` when the requests go to the engine, ``on_tokens`` as a choice's
tokens arrive, ``finish`` once when the response has ended (whole, streamed, aborted or failed).
"""

from __future__ import annotations

import time

from services.frontend.metrics import FrontendMetrics


class RequestMetrics:
    """One HTTP generation request (all its choices). Times are ``time.monotonic()`` seconds."""

    def __init__(self, metrics: FrontendMetrics, endpoint: str, arrival: float):
        self.metrics = metrics
        self.endpoint = endpoint
        self.arrival = arrival
        self.model = metrics.model
        self.first_token_at: float | None = None
        self._last_token_at: dict[int, float] = {}  # choice index -> when its latest token arrived
        self._started = False
        self._finished = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.metrics.in_flight.labels(self.model).inc()
            self.metrics.serving += 1

    def on_tokens(self, index: int, count: int, now: float | None = None) -> None:
        """``count`` tokens of choice ``index`` arrived from the engine (together) at ``now``."""
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.labels(self.model).observe(now - self.arrival)
        itl = self.metrics.itl.labels(self.model)
        last = self._last_token_at.get(index)
        if last is not None:
            itl.observe(now - last)
        for _ in range(count - 1):  # the rest of a multi-token delta came with no gap
            itl.observe(0.0)
        self._last_token_at[index] = now

    def finish(
        self, reason: str, prompt_tokens: int, choice_tokens: list[int], now: float | None = None
    ) -> None:
        """The response has ended. Counted once, and only for a started request."""
        if not self._started or self._finished:
            return
        self._finished = True
        now = time.monotonic() if now is None else now
        m, model = self.metrics, self.model
        generated = sum(choice_tokens)
        m.in_flight.labels(model).dec()
        m.serving -= 1
        m.requests.labels(model, self.endpoint, reason).inc()
        e2e = now - self.arrival
        m.e2e.labels(model).observe(e2e)
        longest = max(choice_tokens, default=0)
        if longest > 1 and self.first_token_at is not None:
            # Choices are generated side by side: the longest one is the request's pace.
            m.tpot.labels(model).observe((now - self.first_token_at) / (longest - 1))
        m.prompt_tokens.labels(model).observe(prompt_tokens)
        m.generation_tokens.labels(model).observe(generated)
        m.token_totals.add(model, prompt_tokens, generated)
