"""Per-replica series on a frontend's /metrics, beside the summed engine gauges (engine_gauges.py),
with a ``replica`` label (the replica's index in --engine-input's order):

- ``pagedserve_frontend_replica_up``: 1 while the replica takes new requests (replicas.py says when);
- ``pagedserve_frontend_replica_requests_running`` / ``_waiting`` and
  ``pagedserve_frontend_replica_kv_cache_usage_ratio``: its engine's last report (stale once it is down);
- ``pagedserve_frontend_replica_routed_requests_total{reason}``: requests this frontend sent it,
  by why: ``affinity`` (it held the prompt's first blocks), ``load`` (no replica did, or the one
  that did was much more loaded), ``round_robin``. A single engine is not routed: none counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.frontend.replicas import EngineReplicas

REASONS = ("affinity", "load", "round_robin")


class ReplicaGauges:
    """A prometheus_client collector of each replica's state."""

    def __init__(self, replicas: EngineReplicas, model_name: Callable[[], str]):
        self.replicas, self.model_name = replicas, model_name

    def collect(self) -> Iterator[Metric]:
        model = self.model_name()
        labels = ["model_name", "replica"]
        up = GaugeMetricFamily("pagedserve_frontend_replica_up", "1 while the replica takes new requests", labels=labels)
        running = GaugeMetricFamily("pagedserve_frontend_replica_requests_running",
                                    "Requests running in the replica's engine (its last report)", labels=labels)
        waiting = GaugeMetricFamily("pagedserve_frontend_replica_requests_waiting",
                                    "Requests waiting in the replica's engine (its last report)", labels=labels)
        usage = GaugeMetricFamily("pagedserve_frontend_replica_kv_cache_usage_ratio",
                                  "Fraction of the replica's KV-cache blocks in use (its last report)", labels=labels)
        routed = CounterMetricFamily("pagedserve_frontend_replica_routed_requests",
                                     "Requests this frontend sent to the replica, by reason",
                                     labels=[*labels, "reason"])
        for i, (client, load) in enumerate(zip(self.replicas.clients, self.replicas.loads())):
            values = [model, str(i)]
            up.add_metric(values, float(load.up))
            pong = client.last_pong
            if pong is not None:
                running.add_metric(values, pong.num_running)
                waiting.add_metric(values, pong.num_waiting)
                usage.add_metric(values, pong.kv_cache_usage)
            for reason in REASONS:
                routed.add_metric([*values, reason], self.replicas.routed[i, reason])
        yield from (up, running, waiting, usage, routed)
