"""Typed queues: numpy frames round-trip, malformed frames are dropped without killing the peer;
with CURVE keys a socket admits only the peers holding its role's key."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import zmq

from shared.auth import CurveClient, client_security, engine_security, generate_keys
from shared.protocol import (
    AddRequest,
    EngineMessage,
    EngineToWorker,
    FrontendMessage,
    Ping,
    Pong,
    WorkerHeartbeat,
    WorkerToEngine,
)
from shared.sampling_params import SamplingParams
from shared.transport import Codec, DealerQueue, RouterQueue


def test_codec_round_trip_with_array_frames():
    codec = Codec(FrontendMessage)
    msg = AddRequest("r1", np.arange(7, dtype=np.int32), SamplingParams(temperature=0.5, stop=["x"]))
    frames = codec.encode(msg)
    assert len(frames) == 2  # body + one array frame
    back = codec.decode([bytes(f) for f in frames])
    assert back.req_id == "r1" and back.prompt_token_ids.tolist() == list(range(7))
    assert back.sampling_params == msg.sampling_params


def test_router_drops_malformed_and_keeps_serving():
    ctx = zmq.Context()
    port = None
    router = RouterQueue(ctx, "tcp://127.0.0.1:*", FrontendMessage, EngineMessage)
    port = router.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
    dealer = DealerQueue(ctx, f"tcp://127.0.0.1:{port}", EngineMessage, FrontendMessage, identity=b"fe1")
    dealer.sock.send_multipart([b"\xc1 not msgpack"])
    dealer.sock.send_multipart([b"\x93\x01\x02"])  # valid msgpack, wrong shape
    dealer.send(Ping(5))
    identity, msg = router.recv(timeout_ms=5000)
    assert identity == b"fe1" and msg == Ping(5)
    router.send(identity, Pong(5, 1, 2))
    assert dealer.recv(timeout_ms=5000) == Pong(5, 1, 2)
    dealer.close()
    router.close()
    ctx.term()


# ----- CURVE (shared/auth.py) -------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path) -> argparse.Namespace:
    generate_keys(tmp_path / "keys")
    return argparse.Namespace(curve_keys_dir=str(tmp_path / "keys"), allow_unauthenticated=False)


def _delivered(router: RouterQueue, dealers: dict[bytes, DealerQueue]) -> set[bytes]:
    """Which dealers' Pings reach the router (each sends one; a refused one never arrives)."""
    for i, dealer in enumerate(dealers.values()):
        dealer.send(Ping(i))
    got = set()
    while (item := router.recv(timeout_ms=1500)) is not None:
        got.add(item[0])
    return got


def test_curve_router_admits_only_its_roles_key(keys, tmp_path):
    engine = engine_security(keys, ["tcp://0.0.0.0:5570"])
    ctx = zmq.Context()
    front = RouterQueue(ctx, "tcp://127.0.0.1:*", FrontendMessage, EngineMessage, security=engine.frontends)
    work = RouterQueue(ctx, "tcp://127.0.0.1:*", WorkerToEngine, EngineToWorker, security=engine.workers)
    generate_keys(tmp_path / "other")  # a stack's worth of keys this engine never saw
    other = argparse.Namespace(curve_keys_dir=str(tmp_path / "other"))
    impostor = client_security(other, "frontend")
    clients = {
        b"plain": None,
        b"worker-key": client_security(keys, "worker"),
        b"foreign-key": CurveClient(impostor.public, impostor.secret, engine.public),
        b"frontend-key": client_security(keys, "frontend"),
    }
    dealers: dict[bytes, DealerQueue] = {}
    workers: dict[bytes, DealerQueue] = {}
    try:
        dealers = {name: DealerQueue(ctx, _endpoint(front), EngineMessage, FrontendMessage, identity=name,
                                     security=sec) for name, sec in clients.items()}
        assert _delivered(front, dealers) == {b"frontend-key"}
        # The admitted one is served both ways.
        front.send(b"frontend-key", Pong(0, 1, 2))
        assert dealers[b"frontend-key"].recv(timeout_ms=5000) == Pong(0, 1, 2)
        workers = {name: DealerQueue(ctx, _endpoint(work), EngineToWorker, WorkerToEngine, identity=name,
                                     security=clients[name]) for name in (b"frontend-key", b"worker-key")}
        for i, dealer in enumerate(workers.values()):
            dealer.send(WorkerHeartbeat(i, "x"))
        assert work.recv(timeout_ms=5000)[0] == b"worker-key"
        assert work.recv(timeout_ms=1500) is None
    finally:
        for q in [*dealers.values(), *workers.values(), front, work]:
            q.close()
        engine.stop()
        ctx.term()


def test_curve_client_never_talks_to_an_engine_with_other_keys(keys, tmp_path):
    other = tmp_path / "other"
    generate_keys(other)
    # The impostor even admits the real frontend's public key; the client still refuses it.
    shutil.copy(Path(keys.curve_keys_dir) / "frontend.key", other / "frontend.key")
    impostor = engine_security(argparse.Namespace(curve_keys_dir=str(other)), [])
    real_frontend = client_security(keys, "frontend")
    ctx = zmq.Context()
    router = RouterQueue(ctx, "tcp://127.0.0.1:*", FrontendMessage, EngineMessage, security=impostor.frontends)
    dealer = DealerQueue(ctx, _endpoint(router), EngineMessage, FrontendMessage, identity=b"fe", security=real_frontend)
    try:
        dealer.send(Ping(1))
        assert router.recv(timeout_ms=1500) is None
    finally:
        dealer.close()
        router.close()
        impostor.stop()
        ctx.term()


def _endpoint(queue: RouterQueue) -> str:
    return queue.sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_generated_keys_are_private_and_never_overwritten(keys):
    directory = Path(keys.curve_keys_dir)
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(f"{r}{ext}" for r in ("engine", "frontend", "worker") for ext in (".key", ".key_secret"))
    for p in directory.glob("*.key_secret"):
        assert p.stat().st_mode & 0o777 == 0o600, p
    before = (directory / "engine.key_secret").read_bytes()
    with pytest.raises(ValueError, match="already holds"):
        generate_keys(directory)
    assert (directory / "engine.key_secret").read_bytes() == before


def test_engine_needs_keys_beyond_loopback(keys, tmp_path):
    plain = argparse.Namespace(curve_keys_dir=None, allow_unauthenticated=False)
    assert engine_security(plain, ["tcp://127.0.0.1:5570", "tcp://localhost:1", "ipc:///tmp/x"]) is None
    with pytest.raises(ValueError, match=r"tcp://0\.0\.0\.0:5572 without authentication"):
        engine_security(plain, ["tcp://127.0.0.1:5570", "tcp://0.0.0.0:5572"])
    with pytest.raises(ValueError, match=r"tcp://\*:1"):
        engine_security(plain, ["tcp://*:1"])
    assert engine_security(argparse.Namespace(curve_keys_dir=None, allow_unauthenticated=True), ["tcp://*:1"]) is None
    # A keys directory missing the engine's secret is a clear error, not a silent plain link.
    (Path(keys.curve_keys_dir) / "engine.key_secret").unlink()
    with pytest.raises(ValueError, match="engine.key_secret"):
        engine_security(keys, ["tcp://*:1"])
    assert client_security(keys, "worker") is not None  # the public engine.key is all a worker needs
