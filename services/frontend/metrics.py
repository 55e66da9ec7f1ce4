"""Prometheus metrics of one frontend process.

Each process keeps its own CollectorRegistry. Several frontends sharing one port (SO_REUSEPORT)
each answer /metrics for themselves only, so a scrape of the shared port sees whichever process
the kernel picked; to scrape every process, start each with its own ``--metrics-port`` (the same
registry is served there too), and tell the series apart by the ``frontend_id`` label of
``pagedserve_frontend_info``. Every HTTP response also carries the answering process's id in the
``x-pagedserve-frontend`` header.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Endpoints counted by name; anything else is "other" (so random paths cannot grow the label set).
ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/version",
        "/metrics",
    }
)
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class FrontendMetrics:
    def __init__(self, frontend_id: str):
        self.registry = CollectorRegistry()
        self.info = Gauge(
            "pagedserve_frontend_info", "This frontend process (value 1)", ["frontend_id"], registry=self.registry
        )
        self.info.labels(frontend_id).set(1)
        self.requests = Counter(
            "pagedserve_frontend_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pagedserve_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first generated token",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "pagedserve_frontend_engine_ready", "1 once the engine has sent its model info", registry=self.registry
        )

        self.engine_requests = Gauge(
            "pagedserve_frontend_engine_requests",
            "Requests in the engine (all frontends'), as of the last health ping this frontend sent",
            ["state"],
            registry=self.registry,
        )

    def observe_engine(self, num_running: int, num_waiting: int) -> None:
        self.engine_requests.labels("running").set(num_running)
        self.engine_requests.labels("waiting").set(num_waiting)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        self.ttft.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
