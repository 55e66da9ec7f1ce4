"""The Responses API's store: stored responses (and the conversation that led to each, for
previous_response_id), bounded by count (least recently used goes first) and by age (TTL), with
metrics for its size and evictions. An unbounded store is a memory leak under agent traffic.

A background response still running is never evicted: evicted, it could be neither polled nor
cancelled while it kept its engine requests, and would come back when done, evicting another.
Its number is bounded by what the engine queues; it counts towards the size, so the least
recently used finished responses go first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

UNFINISHED = ("queued", "in_progress")  # a background response's statuses while it runs


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object as returned
    messages: list[dict[str, Any]]  # the chat conversation including this response's output
    stored_at: float
    input_items: list[dict[str, Any]]  # this response's own input, as items with ids (input_items)


class ResponseStore:
    """At most ``max_entries`` responses, each kept for ``ttl`` seconds; ``clock`` for tests."""

    def __init__(self, max_entries: int, ttl: float, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, model: Callable[[], str] = lambda: "unknown"):
        """model: the model_name label every frontend series carries (it may change once)."""
        if max_entries < 1 or ttl <= 0:
            raise ValueError("the response store needs max_entries >= 1 and ttl > 0")
        self.max_entries, self.ttl, self.clock, self.model = max_entries, ttl, clock, model
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        if registry is not None:
            registry.register(self)  # the size, read at each scrape (collect)
        self.evictions = Counter("pagedserve_frontend_response_store_evictions",
                                 "Responses dropped from the store, by reason", ["model_name", "reason"],
                                 registry=registry)

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]],
            input_items: list[dict[str, Any]] | None = None) -> None:
        self._expire()
        self._items[response_id] = StoredResponse(response, messages, self.clock(), input_items or [])
        self._items.move_to_end(response_id)
        excess = len(self._items) - self.max_entries
        if excess > 0:  # the least recently used finished ones, never the one just stored
            finished = [rid for rid, item in self._items.items() if rid != response_id and not _running(item)]
            for rid in finished[:excess]:
                del self._items[rid]
                self._evicted("capacity")

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response (now the most recently used), or None when unknown or expired."""
        self._expire()
        item = self._items.get(response_id)
        if item is not None:
            self._items.move_to_end(response_id)
        return item

    def delete(self, response_id: str) -> bool:
        self._expire()
        found = self._items.pop(response_id, None) is not None
        return found

    def __contains__(self, response_id: str) -> bool:
        """Held (and not expired), without counting as a use."""
        item = self._items.get(response_id)
        return item is not None and (_running(item) or self.clock() - item.stored_at < self.ttl)

    def _expire(self) -> None:
        """Drop the responses older than the TTL (a scan: the store is bounded)."""
        now = self.clock()
        expired = [rid for rid, item in self._items.items() if now - item.stored_at >= self.ttl and not _running(item)]
        for rid in expired:
            del self._items[rid]
            self._evicted("ttl")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily("pagedserve_frontend_response_store_entries", "Responses held by the store",
                                 labels=["model_name"])
        size.add_metric([self.model()], len(self._items))
        yield size

    def _evicted(self, reason: str) -> None:
        self.evictions.labels(self.model(), reason).inc()


def _running(item: StoredResponse) -> bool:
    return item.response.get("status") in UNFINISHED
