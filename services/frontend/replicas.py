"""The engines one frontend talks to: data-parallel replicas, each an engine with its workers
(``pagedserve serve --data-parallel-size N``, or ``--engine-input A B --engine-output A' B'`` on a
frontend), with one EngineClient each.

Each generation request goes whole (its n samples and prompts) to one replica, chosen by the
router (routing.py) from the prompt's first blocks and each replica's load; from then on that
replica's EngineClient carries it, with its recovery: a replica whose engine restarts gets its
requests resubmitted, one that stays silent fails them after the frontend's --resume-timeout.

A replica is *up* while its engine answers (any message within ``DOWN_AFTER_S``; the client pings
it every second), has all its workers, and serves the model the first replica serves. Only up
replicas take new requests. Its load is what its engine last reported (running + waiting, all
frontends' requests) or this frontend's own open requests on it, whichever is larger: the
report is up to a second old, our own count is current.

``summed`` is what /metrics says of "the engine" (engine_gauges.py) for the whole set: requests
running and waiting summed over the up replicas, KV-cache use as the fraction of all their blocks
in use, num_gpu_blocks their total. With one replica it is exactly that engine's report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import msgspec

from services.frontend.engine_client import EngineClient
from services.frontend.routing import AffinityRouter, ReplicaLoad, RoundRobinRouter
from shared.lora import LoRARequest
from shared.protocol import ModelInfo, Pong

log = logging.getLogger(__name__)

DOWN_AFTER_S = 5.0  # silence after which a replica takes no new requests (pings go every second)


def _same_model(a: ModelInfo, b: ModelInfo) -> bool:
    return (a.model_name, a.vocab_size, a.max_model_len, a.block_size) == (b.model_name, b.vocab_size,
                                                                          b.max_model_len, b.block_size)


class EngineReplicas:
    """N EngineClients and the router choosing one per request. The lifecycle calls (start,
    wait_ready, drain, close) act on all of them."""

    def __init__(self, clients: list[EngineClient], router: AffinityRouter | RoundRobinRouter):
        if not clients:
            raise ValueError("at least one engine is needed")
        self.clients, self.router = clients, router
        self.routed: Counter[tuple[int, str]] = Counter()  # (replica, reason) -> requests sent
        self.summed = _Summed(self)
        self._engine_ids: list[str | None] = [None] * len(clients)
        self._reference: ModelInfo | None = None  # the model every replica must serve
        self._mismatch_logged: set[str] = set()

    # ----- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """The ModelInfo of the first replica to answer (raises TimeoutError)."""
        waits = [asyncio.ensure_future(c.wait_ready()) for c in self.clients]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not done:
            raise TimeoutError("no engine answered")
        info = next(iter(done)).result()
        self._reference = self._reference or info
        return info

    async def wait_all_ready(self) -> None:
        await asyncio.gather(*(c.wait_ready() for c in self.clients))

    @property
    def draining(self) -> bool:
        return any(c.draining for c in self.clients)

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(c.drain(timeout) for c in self.clients))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    # ----- what the endpoints ask ---------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo | None:
        """An up replica's ModelInfo (the first), else any known one; None before any answered."""
        loads = self.loads()
        known = [c.model_info for c in self.clients if c.model_info is not None]
        up = [c.model_info for c, load in zip(self.clients, loads) if load.up]
        return (up or known or [None])[0]

    async def ping(self, timeout: float) -> Pong | None:
        """For /health: every replica pinged at once; the Pong of one that has all its workers,
        else any Pong; None when none answered in time."""
        pongs = [p for p in await asyncio.gather(*(c.ping(timeout) for c in self.clients)) if p is not None]
        return next((p for p in pongs if p.workers_ready), pongs[0] if pongs else None)

    def pick(self, prompt: list[int], lora: LoRARequest | None = None) -> EngineClient:
        """The replica's client that a request with this (first) prompt, under this adapter, goes to."""
        if len(self.clients) == 1:
            return self.clients[0]
        info = self.model_info
        seed = None if lora is None else lora.hash_seed()
        index, reason = self.router.pick(prompt, info.block_size if info else 16, self.loads(), seed)
        self.routed[index, reason] += 1
        return self.clients[index]

    def loads(self) -> list[ReplicaLoad]:
        """Each replica's state as the router sees it (and a restarted engine's prefixes forgotten)."""
        now = time.monotonic()
        out = []
        for i, client in enumerate(self.clients):
            info, pong = client.model_info, client.last_pong
            if info is not None and info.engine_id != self._engine_ids[i]:
                if self._engine_ids[i] is not None:
                    self.router.forget(i)
                self._engine_ids[i] = info.engine_id
            up = (info is not None and now - client.last_heard < DOWN_AFTER_S
                  and (pong is None or pong.workers_ready) and self._serves_reference(info))
            reported = pong.num_running + pong.num_waiting if pong is not None else 0
            usage = pong.kv_cache_usage if pong is not None else 0.0
            out.append(ReplicaLoad(up, max(reported, client.open_requests), usage))
        return out

    def _serves_reference(self, info: ModelInfo) -> bool:
        self._reference = self._reference or info
        if _same_model(info, self._reference):
            return True
        if info.engine_id not in self._mismatch_logged:
            self._mismatch_logged.add(info.engine_id)
            log.error("engine %s serves %s (vocab %d, max_model_len %d, block_size %d), not the first replica's "
                      "%s: it gets no requests", info.engine_id, info.model_name, info.vocab_size, info.max_model_len,
                      info.block_size, self._reference.model_name)
        return False


class _Summed:
    """The replicas seen as one engine, for engine_gauges.EngineGauges (see the module's docstring)."""

    def __init__(self, replicas: EngineReplicas):
        self._replicas = replicas

    def _up(self) -> list[EngineClient]:
        clients = self._replicas.clients
        return [c for c, load in zip(clients, self._replicas.loads()) if load.up and c.last_pong is not None]

    @property
    def last_pong(self) -> Pong | None:
        clients = self._replicas.clients
        if len(clients) == 1:
            return clients[0].last_pong
        up = self._up()
        if not up:
            return None
        pongs = [c.last_pong for c in up]
        blocks = [c.model_info.num_blocks for c in up]
        used = sum(p.kv_cache_usage * b for p, b in zip(pongs, blocks))
        usage = used / sum(blocks) if sum(blocks) else 0.0
        return Pong(0, sum(p.num_running for p in pongs), sum(p.num_waiting for p in pongs),
                    workers_ready=all(p.workers_ready for p in pongs), kv_cache_usage=min(1.0, usage))

    @property
    def last_pong_time(self) -> float:
        return max(c.last_pong_time for c in self._replicas.clients)

    @property
    def model_info(self) -> ModelInfo | None:
        clients = self._replicas.clients
        if len(clients) == 1:
            return clients[0].model_info
        up = self._up()
        if not up:
            return None
        return msgspec.structs.replace(up[0].model_info, num_blocks=sum(c.model_info.num_blocks for c in up))
