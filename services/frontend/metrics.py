"""Prometheus metrics of one frontend process.

Each process keeps its own CollectorRegistry. Several frontends sharing one port (SO_REUSEPORT)
each answer /metrics for themselves only, so a scrape of the shared port sees whichever process
the kernel picked; to scrape every process, start each with its own ``--metrics-port`` (the same
registry is served there too), and tell the series apart by the ``frontend_id`` label of
``pagedserve_frontend_info``. Every HTTP response also carries the answering process's id in the
``x-pagedserve-frontend`` header.

Every series has a ``model_name`` label: the frontend's served model name (the first
``--served-model-name``, else the name the engine reports). A frontend started without
``--served-model-name`` learns it when the engine first answers; the few responses it gives
before that (/health 503s, /metrics) are counted with ``model_name="unknown"``.

Generation requests (/v1/completions, /v1/chat/completions) are measured from the frontend's
view, streamed or not, from their arrival to the end of their response, once per HTTP request
(n > 1 and several prompts included); see ``request_metrics.RequestMetrics``:

- ``pagedserve_frontend_requests_total{endpoint, finish_reason}``: requests admitted (sent to the
  engine) and finished. With several choices the request's reason is ``error`` if any choice
  errored, else ``abort`` if any was aborted, else ``length`` if any hit its length limit, else
  ``stop``. ``error`` is any failure after admission (the engine refused or failed the request,
  stopped answering (503), or the response could not be built); ``abort`` is the client going
  away or the engine aborting. Requests refused before admission (400, 404, ...) are only in
  the HTTP responses counter.
- ``pagedserve_frontend_requests_in_flight``: admitted requests whose response has not ended.
- ``pagedserve_frontend_time_to_first_token_seconds``: arrival to the first token of any choice.
- ``pagedserve_frontend_inter_token_latency_seconds``: per token, the time since the previous
  token of the same choice arrived from the engine.
- ``pagedserve_frontend_time_per_output_token_seconds``: per request, (e2e - ttft) / (tokens - 1)
  where tokens is the longest choice's count (choices are generated side by side), if over 1.
- ``pagedserve_frontend_e2e_request_latency_seconds``: arrival to the end of the response.
- ``pagedserve_frontend_prompt_tokens`` / ``_generation_tokens`` (histograms, per request) and
  ``pagedserve_frontend_prompt_tokens_total`` / ``_generation_tokens_total`` (counters): prompt
  tokens once per request (all its prompts, not times n), generation tokens summed over choices,
  the numbers the response's ``usage`` reports (aborted and failed requests count what they got).
- ``pagedserve_frontend_http_responses_total{endpoint, status}``: every HTTP response; endpoints
  outside ``ENDPOINTS`` are counted as "other".

The engine's own load (waiting and running requests, KV-cache use, cache and LoRA info), which the
inference gateway's endpoint picker routes by, is exported as well: see ``engine_gauges``.

The page is Prometheus text format 0.0.4 on both ports, never OpenMetrics: there the counter
``pagedserve_frontend_prompt_tokens_total`` and the histogram ``pagedserve_frontend_prompt_tokens``
would be one family name, while in the text format they are two.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from services.frontend.engine_gauges import EngineGauges, EngineReports
from services.frontend.replica_gauges import ReplicaGauges
from services.frontend.replicas import EngineReplicas
from shared.metrics import TOKEN_BUCKETS

# Endpoints counted by name; anything else is "other" (so random paths cannot grow the label set).
ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/embeddings",
        "/v1/score",
        "/v1/rerank",
        "/v1/classify",
        "/tokenize",
        "/detokenize",
        "/health",
        "/version",
        "/metrics",
    }
)
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")
FINISH_REASONS = ("stop", "length", "abort", "error")
UNKNOWN_MODEL = "unknown"

_TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
)
_TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _TokenTotals:
    """The two token counters, collected by hand: a prometheus_client Counter would register the
    family ``pagedserve_frontend_prompt_tokens``, the name of the histogram beside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, list[int]] = {}  # model name -> [prompt, generation]

    def add(self, model: str, prompt: int, generation: int) -> None:
        with self._lock:
            totals = self._totals.setdefault(model, [0, 0])
            totals[0] += prompt
            totals[1] += generation

    def collect(self) -> Iterator[CounterMetricFamily]:
        prompt = CounterMetricFamily(
            "pagedserve_frontend_prompt_tokens_total",
            "Prompt tokens of generation requests (once per request)",
            labels=["model_name"],
        )
        generation = CounterMetricFamily(
            "pagedserve_frontend_generation_tokens_total",
            "Tokens generated for generation requests (all choices)",
            labels=["model_name"],
        )
        with self._lock:
            for model, (p, g) in self._totals.items():
                prompt.add_metric([model], p)
                generation.add_metric([model], g)
        yield prompt
        yield generation


class FrontendMetrics:
    """The registry of one process. ``set_model`` names the served model once it is known."""

    def __init__(self, frontend_id: str, model_name: str | None = None):
        self.registry = CollectorRegistry()
        self.frontend_id = frontend_id
        self.model = UNKNOWN_MODEL
        self._ready = False
        self._add_process_series()
        self._add_request_series()
        self._publish_process_series()
        if model_name is not None:
            self.set_model(model_name)

    def _add_process_series(self) -> None:
        reg, m = self.registry, ["model_name"]
        self.info = Gauge("pagedserve_frontend_info", "This frontend process (value 1)", ["frontend_id", *m], registry=reg)
        self.engine_ready = Gauge(
            "pagedserve_frontend_engine_ready", "1 once the engine sent its model info and the tokenizer loaded", m,
            registry=reg,
        )
        self.responses = Counter(
            "pagedserve_frontend_http_responses", "HTTP responses, by endpoint and status code",
            [*m, "endpoint", "status"], registry=reg,
        )

    def _add_request_series(self) -> None:
        reg, m = self.registry, ["model_name"]
        self.requests = Counter(
            "pagedserve_frontend_requests", "Generation requests finished, by endpoint and finish reason",
            [*m, "endpoint", "finish_reason"], registry=reg,
        )
        self.in_flight = Gauge("pagedserve_frontend_requests_in_flight", "Generation requests being served", m,
                               registry=reg)
        self.serving = 0  # the same count, whatever the model label (GET /load)
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to the first token", _TTFT_BUCKETS)
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Gap between successive tokens of one choice", _TOKEN_GAP_BUCKETS
        )
        self.tpot = self._histogram(
            "time_per_output_token_seconds", "Per request: (e2e - ttft) / (output tokens - 1)", _TOKEN_GAP_BUCKETS
        )
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to the end of the response", _E2E_BUCKETS)
        self.prompt_tokens = self._histogram("prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.generation_tokens = self._histogram("generation_tokens", "Generated tokens per request", TOKEN_BUCKETS)
        self.token_totals = _TokenTotals()
        reg.register(self.token_totals)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            f"pagedserve_frontend_{name}", doc, ["model_name"], buckets=buckets, registry=self.registry
        )

    def _publish_process_series(self) -> None:
        self.info.labels(self.frontend_id, self.model).set(1)
        self.engine_ready.labels(self.model).set(1 if self._ready else 0)

    def set_model(self, name: str) -> None:
        """Label everything from now on with ``name``; series of the generation requests start
        at zero, so rates and ratios see the first request."""
        if name == self.model:
            return
        self.info.remove(self.frontend_id, self.model)
        self.engine_ready.remove(self.model)
        self.model = name
        self._publish_process_series()
        for endpoint in GENERATION_ENDPOINTS:
            for reason in FINISH_REASONS:
                self.requests.labels(name, endpoint, reason)
        self.in_flight.labels(name)
        self.token_totals.add(name, 0, 0)

    def set_ready(self) -> None:
        self._ready = True
        self.engine_ready.labels(self.model).set(1)

    def watch_engine(self, source: EngineReports, vllm_names: bool = False) -> None:
        """Export the engine's load as ``source`` last heard it (engine_gauges.py), also under
        vLLM's names with ``vllm_names``."""
        self.registry.register(EngineGauges(source, lambda: self.model, vllm_names))

    def watch_replicas(self, replicas: EngineReplicas) -> None:
        """Export each data-parallel replica's state (replica_gauges.py)."""
        self.registry.register(ReplicaGauges(replicas, lambda: self.model))

    def count_response(self, path: str, status: int) -> None:
        self.responses.labels(self.model, path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve_metrics(metrics: FrontendMetrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``metrics.render()`` (any path) on its own port from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.render()
            self.send_response(200)
            self.send_header("content-type", CONTENT_TYPE)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet: scraped every few seconds
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
