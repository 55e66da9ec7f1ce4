"""The real stack as processes for end-to-end tests: engine, worker and frontends, each with its
own log, plus a raw engine probe (a Ping whose Pong counts the requests the engine holds)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from frontend_helpers import Proc, metric_value, wait_until

from pagedserve.serve import free_port
from shared.protocol import EngineMessage, FrontendMessage, Ping, Pong
from shared.transport import DealerQueue

ENGINE_FLAGS = ("--max-model-len", "1024", "--kv-cache-memory", str(16 << 20))


class Stack:
    """Addresses and processes of one stack; its frontends require ``api_key`` on /v1/* (when
    given). Nothing runs until the start_* methods are called, in any order."""

    def __init__(self, model: Path, logs: Path, api_key: str | None = None,
                 engine_flags: tuple[str, ...] = ENGINE_FLAGS):
        self.model, self.logs, self.api_key, self.engine_flags = model, logs, api_key, engine_flags
        self.inp, self.out, self.wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.metrics_ports: dict[str, int] = {}
        self.engine: Proc | None = None
        self.engine_name = "engine"

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(["-m", "pagedserve.cli", *args], self.logs / f"{name}.log", env={"PAGEDSERVE_LOG_LEVEL": "WARNING"})
        self.procs.append(proc)
        return proc

    def start_worker(self) -> Proc:
        return self.start("worker", "worker", "--model", str(self.model), *self.engine_flags, "--worker-addr",
                          self.wrk, "--metrics-port", str(free_port()))

    def start_engine(self, name: str = "engine", *extra: str) -> Proc:
        """An engine on this stack's addresses (a restarted one too: the worker rejoins it);
        ``extra``: engine-only flags."""
        self.metrics_ports[name] = port = free_port()
        self.engine_name = name
        self.engine = self.start(name, "engine", "--model", str(self.model), *self.engine_flags, "--frontend-input",
                                 self.inp, "--frontend-output", self.out, "--worker-addr", self.wrk,
                                 "--metrics-port", str(port), *extra)
        return self.engine

    def start_frontend(self, frontend_id: str, *extra: str, port: int | None = None) -> Proc:
        """A frontend on ``port`` (default: the stack's shared port), its metrics on a port of its own."""
        self.metrics_ports[frontend_id] = mport = free_port()
        key = ("--api-key", self.api_key) if self.api_key else ()
        return self.start(frontend_id, "frontend", "--engine-input", self.inp, "--engine-output", self.out,
                          "--port", str(self.port if port is None else port), *key, "--frontend-id", frontend_id,
                          "--metrics-port", str(mport), "--log-level", "warning", *extra)

    def metrics(self, frontend_id: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[frontend_id]}/metrics", timeout=5).text

    def idle_metrics(self, frontend_ids: tuple[str, ...] = ("fe-a", "fe-b"), timeout: float = 10.0) -> list[str]:
        """The frontends' metrics pages, once none of them has a request in flight."""
        deadline = time.monotonic() + timeout
        while True:
            pages = [self.metrics(fid) for fid in frontend_ids]
            if sum(metric_value(p, "pagedserve_frontend_requests_in_flight") for p in pages) == 0:
                return pages
            assert time.monotonic() < deadline, "requests still in flight"
            time.sleep(0.05)

    def wait_frontend_ready(self, frontend_id: str, proc: Proc, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, proc.log()
            try:
                if metric_value(self.metrics(frontend_id), "pagedserve_frontend_engine_ready") == 1:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{frontend_id} never became ready:\n{proc.log()[-3000:]}")

    def engine_load(self) -> Pong:
        """Ask the engine directly how many requests it holds."""
        import zmq

        ctx, ident = zmq.Context(), uuid.uuid4().hex.encode()
        tx = DealerQueue(ctx, self.inp, EngineMessage, FrontendMessage, identity=ident)
        rx = DealerQueue(ctx, self.out, EngineMessage, FrontendMessage, identity=ident)
        try:
            time.sleep(0.05)  # let the output connection register before the answer is routed
            tx.send(Ping(1))
            pong = rx.recv(timeout_ms=10_000)
            assert isinstance(pong, Pong), pong
            return pong
        finally:
            tx.close()
            rx.close()
            ctx.term()

    def engine_metric(self, name: str) -> float:
        """One metric of the (latest) engine, from its own /metrics page."""
        return metric_value(self.metrics(self.engine_name), name)

    def wait_engine_idle(self, timeout: float) -> float:
        """Seconds until the engine holds no request (fails after ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            pong = self.engine_load()
            if pong.num_running == 0 and pong.num_waiting == 0:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"the engine still holds requests after {timeout}s")

    def wait_engine_busy(self, timeout: float = 10.0) -> None:
        """Until the engine runs at least one request."""
        deadline = time.monotonic() + timeout
        while self.engine_load().num_running == 0:
            assert time.monotonic() < deadline, "the request never started running"

    def sharing(self, logs: Path, api_key: str | None = None) -> Stack:
        """A Stack on this one's engine and worker, with a port of its own and no processes yet:
        closing it stops only the frontends started through it."""
        st = Stack(self.model, logs, api_key, self.engine_flags)
        st.inp, st.out, st.wrk = self.inp, self.out, self.wrk
        st.engine, st.engine_name = self.engine, self.engine_name
        st.metrics_ports = {self.engine_name: self.metrics_ports[self.engine_name]}
        return st

    def check_running(self) -> None:
        """Fail, with its log, if any process of this stack has exited."""
        for proc in self.procs:
            assert proc.popen.poll() is None, f"{proc.log_path.name} exited:\n{proc.log()[-3000:]}"

    def close(self) -> None:
        for proc in reversed(self.procs):  # frontends first (Goodbye), then engine, then worker
            proc.close()


@contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """``proc`` stopped (SIGSTOP) for the block: a worker so stopped makes no token meanwhile, so
    a test can act on a request in flight however fast the machine is."""
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGCONT)


@contextmanager
def running_stack(model: Path | str, logs: Path, frontend_id: str,
                  engine_flags: tuple[str, ...] = ENGINE_FLAGS) -> Iterator[Stack]:
    """A worker, an engine and one frontend, answering /health; all closed on exit."""
    st = Stack(Path(model), logs, engine_flags=engine_flags)
    try:
        st.start_worker()
        st.start_engine()
        wait_until(f"{st.base}/health", st.start_frontend(frontend_id), timeout=180)
        yield st
    finally:
        st.close()
