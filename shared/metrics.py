"""Prometheus helpers shared by the engine and worker processes (the frontend serves /metrics
on its own HTTP port)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)

# Bucket sets in base units.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics from the default registry on its own thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)


class CounterSync:
    """Feeds a Prometheus counter from a monotonically growing total kept elsewhere."""

    def __init__(self, counter):
        self.counter = counter
        self.last = 0.0

    def set_total(self, total: float) -> None:
        if total > self.last:
            self.counter.inc(total - self.last)
            self.last = total
