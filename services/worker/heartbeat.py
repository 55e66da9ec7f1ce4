"""The worker's heartbeat: a thread of its own telling the engine this rank is alive."""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from shared.auth import CurveClient
from shared.protocol import HEARTBEAT_INTERVAL_S, EngineToWorker, WorkerHeartbeat, WorkerToEngine
from shared.transport import DealerQueue

log = logging.getLogger("pagedserve.worker")


def start_heartbeat(
    ctx: zmq.Context, addr: str, rank: int, instance_id: str, security: CurveClient | None = None
) -> threading.Thread:
    """A daemon thread telling the engine every HEARTBEAT_INTERVAL_S that this rank is alive,
    also while a step runs. Its own socket: ZeroMQ sockets are not shared between threads."""
    queue = DealerQueue(ctx, addr, EngineToWorker, WorkerToEngine, immediate=True, security=security)

    def beat() -> None:
        try:
            while True:
                queue.send(WorkerHeartbeat(rank, instance_id), block=False)  # dropped while the engine is away
                time.sleep(HEARTBEAT_INTERVAL_S)
        except Exception:  # a worker without heartbeats looks lost forever: exit, the supervisor restarts it
            log.exception("the heartbeat thread failed; exiting")
            os._exit(1)

    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()
    return thread
