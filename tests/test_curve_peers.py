"""CURVE on, as real processes: the engine (bound on every interface) and a worker share keys made
by `pagedserve keys`; peers without them, with other keys, or with another role's keys forge
Hellos, requests and WorkerReady messages, and none of it reaches the engine while the real
stack keeps serving."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import zmq
from service_helpers import scrape, stop_processes

from pagedserve.serve import free_port
from shared.auth import CurveClient, client_security
from shared.protocol import (
    AddRequest,
    EngineMessage,
    EngineToWorker,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import DealerQueue

pytestmark = pytest.mark.timeout(300)
CLI = [sys.executable, "-m", "pagedserve.cli"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _keys(directory) -> argparse.Namespace:
    out = subprocess.run([*CLI, "keys", str(directory)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.count(str(directory)) == 6, out.stdout
    return argparse.Namespace(curve_keys_dir=str(directory))


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("curve")
    keys = _keys(work / "keys")
    ports = {name: free_port() for name in ("inp", "out", "wrk", "engine_metrics")}
    model = ["--model", str(model_dirs("llama")), "--max-model-len", "128", "--kv-cache-memory", str(8 << 20)]
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING", PAGEDSERVE_CURVE_KEYS_DIR=keys.curve_keys_dir)
    engine = ["engine", *model, "--frontend-input", f"tcp://0.0.0.0:{ports['inp']}",
              "--frontend-output", f"tcp://0.0.0.0:{ports['out']}", "--worker-addr", f"tcp://0.0.0.0:{ports['wrk']}",
              "--metrics-port", str(ports["engine_metrics"])]
    worker = ["worker", *model, "--worker-addr", f"tcp://127.0.0.1:{ports['wrk']}", "--metrics-port", "0"]
    logs = {name: open(work / f"{name}.log", "wb") for name in ("engine", "worker")}  # noqa: SIM115
    procs = [subprocess.Popen(CLI + engine, env=env, stdout=logs["engine"], stderr=subprocess.STDOUT),
             subprocess.Popen(CLI + worker, env=env, stdout=logs["worker"], stderr=subprocess.STDOUT)]
    yield keys, ports, procs, work / "engine.log"
    stop_processes(procs)
    for f in logs.values():
        f.close()


class Peer:
    """A frontend-like pair of DEALERs with the given CURVE settings (None: plain TCP)."""

    def __init__(self, ports: dict[str, int], security: CurveClient | None):
        self.ctx, self.id = zmq.Context(), uuid.uuid4().hex
        addr = "tcp://127.0.0.1:{}".format
        self.tx = DealerQueue(self.ctx, addr(ports["inp"]), EngineMessage, FrontendMessage, self.id.encode(),
                              security=security)
        self.rx = DealerQueue(self.ctx, addr(ports["out"]), EngineMessage, FrontendMessage, self.id.encode(),
                              security=security)

    def hello(self, timeout_s: float) -> ModelInfo | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tx.send(Hello(self.id), block=False)  # a refused peer cannot even queue it
            msg = self.rx.recv(timeout_ms=500)
            if isinstance(msg, ModelInfo):
                return msg
        return None

    def generate(self, prompt: list[int], timeout_s: float = 60) -> list[int]:
        req_id = f"{self.id}-{len(prompt)}"
        self.tx.send(AddRequest(req_id, np.array(prompt, dtype=np.int32), GREEDY))
        tokens: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.rx.recv(timeout_ms=1000)
            for d in msg.deltas if isinstance(msg, Outputs) else []:
                tokens += d.new_token_ids
                if d.finish_reason:
                    return tokens
        raise TimeoutError(f"no finished output for {req_id}; got {tokens}")

    def close(self) -> None:
        self.tx.send(Goodbye(self.id), block=False)
        self.tx.close()
        self.rx.close()
        self.ctx.term()


def _strangers(keys: argparse.Namespace, tmp_path) -> dict[str, CurveClient | None]:
    """Peers that must be refused: no keys, a whole other stack's keys (trusting our engine's
    public key), and our own worker's keys on the frontend sockets."""
    other = client_security(_keys(tmp_path / "other"), "frontend")
    ours = client_security(keys, "frontend")
    return {"plain": None, "other-keys": CurveClient(other.public, other.secret, ours.server_public),
            "worker-keys": client_security(keys, "worker")}


@pytest.fixture(scope="module")
def served(stack) -> list[int]:
    """The keyed frontend's greedy tokens before any forgery (the stack is up once this returns)."""
    keys, ports, _, _ = stack
    peer = Peer(ports, client_security(keys, "frontend"))
    try:
        assert peer.hello(timeout_s=180) is not None, "the keyed frontend never got ModelInfo"
        return peer.generate([11, 12, 13])
    finally:
        peer.close()


def test_frontends_without_the_frontend_key_get_nothing(stack, served, tmp_path):
    keys, ports, _, engine_log = stack
    # the `served` peer has left: its Goodbye (or, where its socket closed before sending it, its
    # silence past the engine's 10 s --frontend-timeout) counted, so the count below is the strangers'
    deadline = time.monotonic() + 30
    while scrape(ports["engine_metrics"])["pagedserve_engine_connected_frontends"] != 0:
        assert time.monotonic() < deadline, "the served peer is still counted as connected"
        time.sleep(0.2)
    for name, security in _strangers(keys, tmp_path).items():
        peer = Peer(ports, security)
        try:
            assert peer.hello(timeout_s=3) is None, f"{name}: the engine answered a forged Hello"
            peer.tx.send(AddRequest(f"{peer.id}-x", np.array([11, 12, 13], dtype=np.int32), GREEDY), block=False)
            assert peer.rx.recv(timeout_ms=2000) is None, f"{name}: got an answer to a forged request"
        finally:
            peer.close()
    engine = scrape(ports["engine_metrics"])
    assert engine["pagedserve_engine_connected_frontends"] == 0
    assert engine["pagedserve_engine_requests_running"] == engine["pagedserve_engine_requests_waiting"] == 0
    assert "refused a frontend connection" in engine_log.read_text()
    _assert_still_serving(stack, served)


def test_forged_worker_ready_never_registers(stack, served, tmp_path):
    keys, ports, _, _ = stack
    strangers = _strangers(keys, tmp_path)
    strangers["frontend-keys"] = client_security(keys, "frontend")  # a frontend's keys cannot forge a worker
    del strangers["worker-keys"]
    ctx = zmq.Context()
    forged = WorkerReady(rank=0, world_size=1, num_blocks=4, block_size=16, max_model_len=128, instance_id="forged")
    try:
        for name, security in strangers.items():
            # Rank 0's own routing identity: a takeover attempt.
            q = DealerQueue(ctx, f"tcp://127.0.0.1:{ports['wrk']}", EngineToWorker, WorkerToEngine,
                            identity=b"worker-0", security=security)
            for _ in range(3):
                q.send(forged, block=False)
                q.send(WorkerHeartbeat(0, "forged"), block=False)
                time.sleep(0.3)
            assert q.recv(timeout_ms=3000) is None, f"{name}: the engine answered a forged WorkerReady"
            q.close()
    finally:
        ctx.term()
    engine = scrape(ports["engine_metrics"])
    assert engine["pagedserve_engine_connected_workers"] == 1
    assert engine["pagedserve_engine_worker_restarts_total"] == 0  # rank 0 was never taken over
    _assert_still_serving(stack, served)


def _assert_still_serving(stack, served: list[int]) -> None:
    """The real stack still serves the keyed frontend, with the same tokens, and nothing died."""
    keys, ports, procs, _ = stack
    peer = Peer(ports, client_security(keys, "frontend"))
    try:
        assert peer.hello(timeout_s=30) is not None
        assert peer.generate([11, 12, 13]) == served
    finally:
        peer.close()
    assert all(p.poll() is None for p in procs)


def test_engine_refuses_to_bind_beyond_loopback_without_keys(model_dirs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    out = subprocess.run(
        [*CLI, "engine", "--model", str(model_dirs("llama")), "--frontend-input", f"tcp://0.0.0.0:{free_port()}",
         "--metrics-port", "0"], check=False, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "without authentication" in out.stderr and "pagedserve keys" in out.stderr
