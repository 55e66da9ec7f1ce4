"""What a frontend's /metrics says of its engine, for the inference gateway's endpoint picker.

The Gateway API Inference Extension's endpoint picker routes among model-server pods by scraping
each pod's /metrics: queued and running requests, KV-cache utilization, the KV cache's block size
and block count, and for LoRA affinity the adapters loaded. A pagedserve replica's HTTP endpoint is
its frontend, so the frontend exports its engine's numbers, taken from the last Pong the engine
sent it (the engine client pings every second, and on every /health probe):

- ``pagedserve_frontend_engine_requests_waiting`` / ``_running``: the engine's queue and batch (all
  frontends' requests, not only this one's);
- ``pagedserve_frontend_engine_kv_cache_usage_ratio``: the fraction of KV blocks in use, 0..1;
- ``pagedserve_frontend_cache_config_info{block_size, num_gpu_blocks}`` (value 1), from the
  engine's ModelInfo;
- ``pagedserve_frontend_lora_requests_info{max_lora, running_lora_adapters,
  waiting_lora_adapters}``: the engine's --max-loras ("0" without --enable-lora) and the adapters
  of its running and waiting requests, comma-separated names; its value, as vLLM's, is the Unix
  time of the report.

With ``vllm_names`` the same series are also exported under vLLM's names
(``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` (a
fraction, as vLLM's), ``vllm:cache_config_info``, ``vllm:lora_requests_info``), for routers and
dashboards built for vLLM. Nothing is exported before the engine's first answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from shared.protocol import ModelInfo, Pong

# (pagedserve name, vLLM name, help); deploy/k8s/gateway/epp-config.yaml names the first of each
WAITING = ("pagedserve_frontend_engine_requests_waiting", "vllm:num_requests_waiting", "Requests waiting in the engine")
RUNNING = ("pagedserve_frontend_engine_requests_running", "vllm:num_requests_running", "Requests running in the engine")
KV_USAGE = ("pagedserve_frontend_engine_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc",
            "Fraction of the engine's KV-cache blocks in use (0..1)")
CACHE_INFO = ("pagedserve_frontend_cache_config_info", "vllm:cache_config_info",
              "The engine's KV cache: block size (tokens) and number of blocks (value 1)")
LORA_INFO = ("pagedserve_frontend_lora_requests_info", "vllm:lora_requests_info",
             "LoRA adapters: the most at once, those running and waiting (value: time of the report)")


class EngineReports(Protocol):
    """What the engine client knows of its engine (services.frontend.engine_client.EngineClient)."""

    model_info: ModelInfo | None
    last_pong: Pong | None
    last_pong_time: float  # Unix time the last Pong arrived


class EngineGauges:
    """A prometheus_client collector of the engine's numbers as of the last Pong."""

    def __init__(self, source: EngineReports, model_name: Callable[[], str], vllm_names: bool = False):
        self.source, self.model_name, self.vllm_names = source, model_name, vllm_names

    def collect(self) -> Iterator[Metric]:
        pong, info = self.source.last_pong, self.source.model_info
        if pong is None:
            return
        model = self.model_name()
        values = (pong.num_waiting, pong.num_running, pong.kv_cache_usage)
        for names, value in zip((WAITING, RUNNING, KV_USAGE), values):
            yield from self._family(names, {"model_name": model}, value)
        if info is not None:
            labels = {"model_name": model, "block_size": str(info.block_size), "num_gpu_blocks": str(info.num_blocks)}
            yield from self._family(CACHE_INFO, labels, 1.0)
        lora = {"model_name": model, "max_lora": str(info.max_loras if info is not None else 0),
                "running_lora_adapters": ",".join(pong.running_loras),
                "waiting_lora_adapters": ",".join(pong.waiting_loras)}
        yield from self._family(LORA_INFO, lora, self.source.last_pong_time or time.time())

    def _family(self, names: tuple[str, str, str], labels: dict[str, str], value: float) -> Iterator[Metric]:
        ours, vllm, doc = names
        for name in (ours, vllm) if self.vllm_names else (ours,):
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            yield family
