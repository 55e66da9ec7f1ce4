"""Engine metrics: queue depths and saturation, KV usage, prefix cache, preemptions, rejections,
step timings and each step's timeline (plan, worker compute and idle, transport), and speculative
decoding's proposals and acceptances (vLLM's spec_decode counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.engine.scheduler import Scheduler
from services.engine.spec_decode import SpecDecoder
from services.engine.timeline import STEP_PART_BUCKETS, StepTimeline
from shared.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, CounterSync


class EngineMetrics:
    def __init__(self, model_name: str):
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels)).labels(**labels)

        def counter(name: str, doc: str) -> CounterSync:
            return CounterSync(Counter(name, doc, list(labels)).labels(**labels))

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets).labels(**labels)

        self.running = gauge("pagedserve_engine_requests_running", "Requests in the running batch.")
        self.waiting = gauge("pagedserve_engine_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("pagedserve_engine_kv_cache_usage_ratio", "Fraction of KV blocks in use.")
        self.frontends = gauge(
            "pagedserve_engine_connected_frontends", "Frontends heard from within the frontend timeout."
        )
        self.oldest_waiting = gauge(
            "pagedserve_engine_oldest_waiting_seconds", "Age of the oldest request in the waiting queue (0: none)."
        )
        self.queue_time = histogram(
            "pagedserve_engine_request_queue_time_seconds",
            "Time from a request's arrival to its first schedule.",
            LATENCY_BUCKETS + (60.0, 120.0, 300.0),
        )
        self._model_name = model_name
        self._rejected = Counter(
            "pagedserve_engine_rejected_requests",
            "Requests refused with 503 because a queue limit was reached, by limit.",
            [*labels, "reason"],
        )
        self.workers = gauge("pagedserve_engine_connected_workers", "Worker ranks connected and alive.")
        self.prefix_queried = counter(
            "pagedserve_engine_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter("pagedserve_engine_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.")
        self.prefix_evictions = counter(
            "pagedserve_engine_prefix_cache_evictions", "Cached KV blocks taken back from the prefix cache for new tokens."
        )
        self.preemptions = counter(
            "pagedserve_engine_preemptions", "Requests preempted for recompute (KV blocks short, or the workers restarted)."
        )
        self.pooled_requests = counter(
            "pagedserve_engine_pooling_requests", "Pooling requests (embeddings, scores) finished with their vector."
        )
        self.pooled_tokens = counter("pagedserve_engine_pooling_tokens", "Input tokens of the pooling requests finished.")
        self.worker_restarts = Counter(
            "pagedserve_engine_worker_restarts",
            "Times the workers started afresh after a rank was lost or re-joined.",
            list(labels),
        ).labels(**labels)
        self.worker_wait = counter(
            "pagedserve_engine_worker_wait_seconds", "Time the engine spent idle, waiting for worker results."
        )
        spec = "pagedserve_engine_spec_decode_"
        self.spec_drafts = counter(spec + "num_drafts", "Verifications of proposed tokens (one per request and step).")
        self.spec_draft_tokens = counter(spec + "num_draft_tokens", "Tokens proposed by speculative decoding.")
        self.spec_accepted = counter(spec + "num_accepted_tokens", "Proposed tokens accepted.")
        self._spec_per_pos = Counter(
            spec + "num_accepted_tokens_per_pos", "Proposed tokens accepted, by position in the proposal (0: first).",
            [*labels, "position"],
        )
        self._spec_positions: list[CounterSync] = []
        self.tokens_per_step = histogram(
            "pagedserve_engine_scheduled_tokens_per_step", "Tokens scheduled in one step.", TOKEN_BUCKETS
        )
        self.step_duration = histogram(
            "pagedserve_engine_step_duration_seconds", "Wall time of one engine step.", LATENCY_BUCKETS
        )
        self.overhead = histogram(
            "pagedserve_engine_scheduling_overhead_seconds",
            "Engine time per step outside the workers (scheduling and output processing).",
            LATENCY_BUCKETS,
        )

        part = "Per step, the time {}."
        self.plan = histogram("pagedserve_engine_step_plan_seconds", part.format("the engine took to plan it"), STEP_PART_BUCKETS)
        self.worker_compute = histogram(
            "pagedserve_engine_step_worker_compute_seconds", part.format("the worker computed it"), STEP_PART_BUCKETS
        )
        self.worker_idle = histogram(
            "pagedserve_engine_step_worker_idle_seconds",
            part.format("the worker waited for its plan since its previous step"),
            STEP_PART_BUCKETS,
        )
        self.transport = histogram(
            "pagedserve_engine_step_transport_seconds",
            part.format("its plan and result travelled while their receiver waited"),
            STEP_PART_BUCKETS,
        )

    def observe_timeline(self, timeline: StepTimeline) -> None:
        self.worker_compute.observe(timeline.compute_s)
        self.worker_idle.observe(timeline.idle_s)
        self.transport.observe(timeline.transport_s)

    def reject(self, reason: str) -> None:
        """Count a request refused at admission (reason: the limit it hit)."""
        self._rejected.labels(model_name=self._model_name, reason=reason).inc()

    def observe_step(self, scheduler: Scheduler, tokens: int, duration: float, waited: float) -> None:
        self.tokens_per_step.observe(tokens)
        self.step_duration.observe(duration)
        self.overhead.observe(max(0.0, duration - waited))
        self.update(scheduler)

    def update(self, scheduler: Scheduler) -> None:
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.oldest_waiting.set(scheduler.oldest_waiting_age())
        for seconds in scheduler.queue_times:  # taken once, also when the step was lost
            self.queue_time.observe(seconds)
        scheduler.queue_times.clear()
        self.kv_usage.set(scheduler.kv.usage)
        self.prefix_queried.set_total(scheduler.kv.prefix_queried_tokens)
        self.prefix_hits.set_total(scheduler.kv.prefix_hit_tokens)
        self.prefix_evictions.set_total(scheduler.kv.pool.num_evictions)
        self.preemptions.set_total(scheduler.num_preemptions)
        self.pooled_requests.set_total(scheduler.num_pooled_requests)
        self.pooled_tokens.set_total(scheduler.num_pooled_tokens)
        if scheduler.spec is not None:
            self._update_spec(scheduler.spec)

    def _update_spec(self, spec: SpecDecoder) -> None:
        self.spec_drafts.set_total(spec.num_drafts)
        self.spec_draft_tokens.set_total(spec.num_draft_tokens)
        self.spec_accepted.set_total(spec.num_accepted_tokens)
        while len(self._spec_positions) < len(spec.accepted_per_position):
            position = str(len(self._spec_positions))
            self._spec_positions.append(CounterSync(self._spec_per_pos.labels(self._model_name, position)))
        for sync, total in zip(self._spec_positions, spec.accepted_per_position):
            sync.set_total(total)
