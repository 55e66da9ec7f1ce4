"""Helpers for tests that run the services as real processes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, float]:
    """Metric name -> value from a service's /metrics (labels dropped; one series per name here)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape_until(port: int, done: Callable[[dict[str, float]], bool], timeout_s: float = 15) -> dict[str, float]:
    """scrape(port) once `done` holds for it (gauges an idle loop refreshes may lag a moment), or
    the last scrape when `timeout_s` passes first (the caller's assertions then say what is off)."""
    deadline = time.monotonic() + timeout_s
    while not done(metrics := scrape(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return metrics


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 10) -> None:
    """SIGTERM every process, then SIGKILL those still running after `timeout_s`."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def sse_events(url: str, body: dict, started: threading.Event | None = None) -> list[str]:
    """The data payloads of a streamed POST to ``url`` (``[DONE]`` included); ``started`` is set
    once three have arrived."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
            if len(events) == 3 and started is not None:
                started.set()
    return events
