"""vLLM's periodic stats line, from the engine loop (off with --disable-log-stats):

    Engine 000: Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 96.0 tokens/s,
    Running: 8 reqs, Waiting: 2 reqs, KV cache usage: 31.2%, Prefix cache hit rate: 44.0%

Throughputs and the hit rate cover the interval since the previous line. Prompt throughput counts
the prompt tokens the workers computed (prefix-cache hits are not computed; a preempted request's
recompute is). An idle interval logs at DEBUG only, as vLLM does, so an idle server stays quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.engine.scheduler import Scheduler
from shared.protocol import RequestDelta

log = logging.getLogger("pagedserve.engine.stats")


class StatsLogger:
    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"log_stats_interval must be positive, got {interval_s}")
        self.interval_s, self.clock = interval_s, clock
        self.last_log = clock()
        self.prompt_tokens = self.generation_tokens = 0
        self._started: set[str] = set()  # requests that have had their first token
        self._prefix = (0, 0)  # (queried, hit) prompt tokens at the previous line

    def record(self, deltas: list[RequestDelta], scheduled_tokens: int) -> None:
        """One collected step: ``scheduled_tokens`` computed, ``deltas`` its new tokens. A decode
        computes one token and samples one; a prompt chunk computes its tokens and samples one
        only when it completes the prompt (the request's first token)."""
        generated = first = 0
        for delta in deltas:
            if delta.new_token_ids:
                generated += len(delta.new_token_ids)
                if delta.req_id not in self._started:
                    first += 1
                    self._started.add(delta.req_id)
            if delta.finish_reason is not None:
                self._started.discard(delta.req_id)
        self.generation_tokens += generated
        self.prompt_tokens += max(0, scheduled_tokens - generated + first)

    def maybe_log(self, scheduler: Scheduler) -> str | None:
        """The line, logged, once an interval has passed since the previous one; else None."""
        now = self.clock()
        elapsed = now - self.last_log
        if elapsed < self.interval_s:
            return None
        kv = scheduler.kv
        queried = kv.prefix_queried_tokens - self._prefix[0]
        hits = kv.prefix_hit_tokens - self._prefix[1]
        line = (
            f"Engine 000: Avg prompt throughput: {self.prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {self.generation_tokens / elapsed:.1f} tokens/s, "
            f"Running: {scheduler.num_running} reqs, Waiting: {scheduler.num_waiting} reqs, "
            f"KV cache usage: {100 * kv.usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hits / queried if queried else 0.0:.1f}%"
        )
        idle = not (self.prompt_tokens or self.generation_tokens or scheduler.num_running or scheduler.num_waiting)
        log.log(logging.DEBUG if idle else logging.INFO, "%s", line)
        self.last_log, self._prefix = now, (kv.prefix_queried_tokens, kv.prefix_hit_tokens)
        self.prompt_tokens = self.generation_tokens = 0
        self._started &= set(scheduler.requests)  # forget aborted requests (their abort is not a step's)
        return line
