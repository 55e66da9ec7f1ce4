"""Typed ZeroMQ queues: they own the sockets and the encoding, so service code never calls
socket.send or msgspec.encode itself.

Wire format: a multipart message whose first frame is the msgpack body; every numpy array in
the message (token ids) is sent as a frame of its own, referenced from the body by an ext
record (dtype, shape, frame index), and received without a copy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import numpy as np
import zmq
import zmq.asyncio

if TYPE_CHECKING:
    from shared.auth import Security

log = logging.getLogger(__name__)

T = TypeVar("T")
_EXT_NDARRAY = 1


class Codec(Generic[T]):
    """msgpack for one message type (usually a tagged union), numpy arrays out of band."""

    def __init__(self, type_: Any):
        self._frames: list[Any] = []
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._decoder = msgspec.msgpack.Decoder(type_, ext_hook=self._ext_hook, dec_hook=lambda _t, obj: obj)

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            meta = msgspec.msgpack.encode((arr.dtype.str, arr.shape, len(self._frames)))
            self._frames.append(arr.data)
            return msgspec.msgpack.Ext(_EXT_NDARRAY, meta)
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != _EXT_NDARRAY:
            raise msgspec.ValidationError(f"unknown ext code {code}")
        dtype, shape, index = msgspec.msgpack.decode(data)
        if not 0 < index < len(self._frames):
            raise msgspec.ValidationError("array frame index out of range")
        return np.frombuffer(self._frames[index], dtype=np.dtype(dtype)).reshape(shape)

    def encode(self, msg: T) -> list[Any]:
        self._frames = [b""]
        try:
            head = self._encoder.encode(msg)
            frames = self._frames
            frames[0] = head
            return frames
        finally:
            self._frames = []

    def decode(self, frames: list[Any]) -> T:
        """Raises ValueError (msgspec.DecodeError / ValidationError) for a malformed message."""
        self._frames = frames
        try:
            return self._decoder.decode(frames[0])
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed message: {exc}") from exc
        finally:
            self._frames = []


def _socket(
    ctx: zmq.Context, kind: int, addr: str, bind: bool, identity: bytes | None, monitor: int = 0,
    immediate: bool = False, security: Security | None = None,
) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A configured socket, bound or connected, and a monitor socket for `monitor` events
    (attached before connecting, so the first connection's events are never missed). With
    `immediate`, messages are only queued for a live connection, never while it is down.
    `security` (shared.auth) sets CURVE up before the socket binds or connects."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if security is not None:
        security.apply(sock)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same identity takes over
    watcher = sock.get_monitor_socket(monitor) if monitor else None
    (sock.bind if bind else sock.connect)(addr)
    return sock, watcher


class RouterQueue(Generic[T]):
    """The binding side: receives (peer identity, message) and sends messages to a peer.
    A malformed message is logged and dropped."""

    def __init__(
        self, ctx: zmq.Context, addr: str, recv_type: Any, send_type: Any, bind: bool = True,
        security: Security | None = None,
    ):
        self.sock, _ = _socket(ctx, zmq.ROUTER, addr, bind, None, security=security)
        self._in: Codec = Codec(recv_type)
        self._out: Codec = Codec(send_type)

    def recv(self, timeout_ms: int | None = None) -> tuple[bytes, Any] | None:
        while True:
            if timeout_ms is not None and not self.sock.poll(timeout_ms):
                return None
            identity, *frames = self.sock.recv_multipart(copy=False)
            try:
                return identity.bytes, self._in.decode([f.buffer for f in frames])
            except ValueError as exc:
                log.warning("dropped a malformed message from %r: %s", identity.bytes, exc)

    def send(self, identity: bytes, msg: Any) -> None:
        self.sock.send_multipart([identity, *self._out.encode(msg)], copy=False)

    def close(self) -> None:
        self.sock.close()


class DealerQueue(Generic[T]):
    """The connecting side (blocking): sends messages, receives typed replies. With `monitor`
    (zmq.EVENT_* flags), `self.monitor` delivers those connection events; `immediate` and
    `security` as in _socket."""

    def __init__(
        self,
        ctx: zmq.Context,
        addr: str,
        recv_type: Any,
        send_type: Any,
        identity: bytes | None = None,
        monitor: int = 0,
        immediate: bool = False,
        security: Security | None = None,
    ):
        self.sock, self.monitor = _socket(ctx, zmq.DEALER, addr, False, identity, monitor, immediate, security)
        self._in: Codec = Codec(recv_type)
        self._out: Codec = Codec(send_type)

    def send(self, msg: Any, block: bool = True) -> bool:
        """False when block=False and the message could not be queued (no live connection)."""
        try:
            self.sock.send_multipart(self._out.encode(msg), flags=0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_ms: int | None = None) -> Any | None:
        while True:
            if timeout_ms is not None and not self.sock.poll(timeout_ms):
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                return self._in.decode([f.buffer for f in frames])
            except ValueError as exc:
                log.warning("dropped a malformed message: %s", exc)

    def close(self) -> None:
        self.sock.close()


class AsyncDealerQueue(Generic[T]):
    """The connecting side for asyncio code (the frontend)."""

    def __init__(
        self, ctx: zmq.asyncio.Context, addr: str, recv_type: Any, send_type: Any, identity: bytes,
        security: Security | None = None,
    ):
        self.sock, _ = _socket(ctx, zmq.DEALER, addr, False, identity, security=security)
        self._in: Codec = Codec(recv_type)
        self._out: Codec = Codec(send_type)

    async def send(self, msg: Any) -> None:
        await self.sock.send_multipart(self._out.encode(msg), copy=False)

    async def recv(self) -> Any:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                return self._in.decode([f.buffer for f in frames])
            except ValueError as exc:
                log.warning("dropped a malformed message: %s", exc)

    def close(self) -> None:
        self.sock.close()
