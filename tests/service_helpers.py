"""Helpers for tests that run the services as real processes."""

from __future__ import annotations

import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, float]:
    """Metric name -> value from a service's /metrics (labels dropped; one series per name here)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 10) -> None:
    """SIGTERM every process, then SIGKILL those still running after `timeout_s`."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
