"""The offline LLM's model executor: its own ModelRunner for one rank; for tensor or pipeline
parallelism, every rank as a child process running the served worker's code
(services.worker.service.run_rank), driven over the same ZeroMQ/msgspec protocol by the
engine's own WorkerGroup, as vLLM's offline API drives its worker processes.

The LLM process keeps the scheduler and runs no rank itself (its interpreter stays free of a
process group, so several LLMs can live in one process). The ranks come from multiprocessing's
fork server (a clean process spawned once, never a fork of the threaded LLM process, that has
imported the worker's modules, so a rank starts in a moment); each holds one end of a pipe whose
other end only the LLM's process holds, and exits when it closes, so none outlives the LLM's
process even when that is killed. A rank that fails to start is named with its error within the start timeout;
a rank that dies later fails the step waiting for it. ``shutdown()`` (also on ``del``, at
interpreter exit, and on leaving a ``with LLM(...)`` block) stops them all.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zmq

from services.engine.workers import WorkerError, WorkerGroup, WorkerLost
from shared.config import EngineConfig
from shared.engine_args import DEFAULT_DIST_TIMEOUT_S
from shared.protocol import StepPlan, StepResult

log = logging.getLogger("pagedserve.llm")

# Seconds every rank may take to load its weights and report; PAGEDSERVE_RANK_START_TIMEOUT overrides.
START_TIMEOUT_S = 600.0
_STOP_GRACE_S = 5.0  # after Shutdown, before SIGTERM (then SIGKILL)


def make_executor(config: EngineConfig, device: str | None) -> Any:
    """A ModelRunner in this process for one rank, else the ranks' child processes. Either has
    ``num_blocks``; the engine core drives both."""
    import torch

    from services.worker.model_runner import ModelRunner, parse_device

    parsed = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.parallel.world_size == 1:
        return ModelRunner(config, parsed)
    return RankProcesses(config, parsed.type)


class LLMLifecycle:
    """LLM's shutdown() and ``with`` support: stops the rank processes, if any."""

    runner: Any

    def shutdown(self) -> None:
        """Stop the worker rank processes (a no-op for one rank, and when stopped already)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


class RankProcesses:
    """The worker ranks as child processes, and the engine's WorkerGroup that drives them: the
    engine core's pipeline (submit / collect, as in the served engine)."""

    def __init__(self, config: EngineConfig, device_type: str, start_timeout_s: float | None = None):
        self.sock_dir = tempfile.mkdtemp(prefix="pagedserve-llm-")
        self.ctx = zmq.Context()
        addr = f"ipc://{self.sock_dir}/workers"
        self.group = WorkerGroup(self.ctx, addr, config, uuid.uuid4().hex)
        # A fork server: a clean process, started once per LLM process (no fork of this threaded
        # one), that imports the worker's modules once; each rank is a fork of it.
        spawn = multiprocessing.get_context("forkserver")
        spawn.set_forkserver_preload(["services.worker.service"])
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        # Each rank exits when this pipe's write end, held here alone, closes: when this process
        # ends, however it ends (the fork server outlives it while the ranks run).
        lifeline, self.lifeline = spawn.Pipe(duplex=False)
        self.procs = []
        for rank in range(config.parallel.world_size):
            rank_config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, rank=rank))
            device = f"cuda:{rank}" if device_type == "cuda" else device_type
            proc = spawn.Process(target=rank_main, name=f"pagedserve-rank-{rank}", daemon=True,
                                 args=(rank_config, addr, init_method, device, self.sock_dir, lifeline))
            self.procs.append(proc)
        # set before any start: whatever happens next, the children and sockets go with this object
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.group, self.ctx, self.sock_dir,
                                          self.lifeline)
        try:
            for proc in self.procs:
                proc.start()
            lifeline.close()  # the ranks hold the read end
            self.num_blocks = self._handshake(start_timeout_s or float(
                os.environ.get("PAGEDSERVE_RANK_START_TIMEOUT", START_TIMEOUT_S)))
        except BaseException:
            self._finalizer()
            raise
        # a closure over the processes, not self: no reference cycle, so `del llm` stops them at once
        self.group.on_wait = functools.partial(_check_alive, self.procs, self.sock_dir)

    def _handshake(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.group.handshake(min(1.0, max(0.01, deadline - time.monotonic())))
            except WorkerError:
                _check_alive(self.procs, self.sock_dir)
                if time.monotonic() >= deadline:
                    missing = sorted(set(range(len(self.procs))) - set(self.group.ranks))
                    raise RuntimeError(f"worker rank(s) {missing} did not start within {timeout_s:g}s "
                                       "(PAGEDSERVE_RANK_START_TIMEOUT)") from None

    def submit(self, plan: StepPlan) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this LLM has been shut down (shutdown(), or the end of its with block)")
        _check_alive(self.procs, self.sock_dir)
        self.group.poll()  # heartbeats received since the last step
        self.group.submit(plan)

    def collect(self, plan: StepPlan) -> StepResult:
        return self.group.collect(plan)

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def shutdown(self) -> None:
        self._finalizer()


def _free_port() -> int:
    from pagedserve.serve import free_port

    return free_port()


def _check_alive(procs: list, sock_dir: str) -> None:
    """WorkerLost naming every rank process that has exited, with the error it left, if any (when
    one dies, its peers' collectives fail and they exit too)."""
    dead = [f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}{_error_of(sock_dir, rank)}"
            for rank, proc in enumerate(procs) if proc.exitcode is not None]
    if dead:
        raise WorkerLost("; ".join(dead))


def _error_of(sock_dir: str, rank: int) -> str:
    path = Path(sock_dir) / f"rank{rank}.error"
    return f": {path.read_text().strip()}" if path.is_file() else ""


def _stop(procs: list, group: WorkerGroup, ctx: zmq.Context, sock_dir: str, lifeline: Connection) -> None:
    """Tell the connected ranks to stop and give them a moment; SIGTERM, then SIGKILL, whatever
    still runs (a rank still starting at once); close the sockets."""
    told = set(group.ranks)
    try:
        group.shutdown()
    except zmq.ZMQError:
        pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for rank, proc in enumerate(procs):
        if proc.pid is not None and rank in told:
            proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            proc.terminate()
            proc.join(2.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    lifeline.close()
    group.queue.close()  # LINGER 0: nothing left to deliver, so term() cannot block
    ctx.term()
    shutil.rmtree(sock_dir, ignore_errors=True)


def rank_main(config: EngineConfig, worker_addr: str, init_method: str, device: str, sock_dir: str,
              lifeline: Connection) -> None:
    """A rank process: the served worker's rank loop; an error that ends it is left in the socket
    folder for the parent's message."""
    import torch

    from services.worker.rendezvous import Rendezvous
    from services.worker.service import run_rank

    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True, name="parent-watch").start()
    rank = config.parallel.rank
    rdzv = Rendezvous(init_method, rank, rank, config.parallel.world_size, DEFAULT_DIST_TIMEOUT_S)
    try:
        code = run_rank(config, rdzv, torch.device(device), worker_addr)
    except Exception as exc:  # noqa: BLE001 (whatever ends the rank, the parent names it)
        Path(sock_dir, f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        os._exit(1)
    os._exit(code)  # no atexit work: the parent holds nothing of ours


def _watch_parent(lifeline: Connection) -> None:
    """Exit once the LLM's process is gone (its end of the lifeline closed): no orphans, even
    when it is killed."""
    try:
        lifeline.recv_bytes()  # nothing is ever sent: this returns only at the end
    except (EOFError, OSError):
        pass
    os._exit(1)
