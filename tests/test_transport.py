"""Typed queues: numpy frames round-trip, malformed frames are dropped without killing the peer."""

from __future__ import annotations

import numpy as np
import zmq

from shared.protocol import AddRequest, EngineMessage, FrontendMessage, Ping, Pong
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
