"""ZeroMQ CURVE authentication of the links between services, with pyzmq's own `zmq.auth`.

Keys live in one directory (a Kubernetes Secret or compose secrets mounted as files), written by
`pagedserve keys DIR` with `zmq.auth.create_certificates`:

    engine.key    engine.key_secret      the engine's keypair (its ROUTER sockets are CURVE servers)
    frontend.key  frontend.key_secret    the keypair every frontend presents
    worker.key    worker.key_secret      the keypair every worker rank presents

The engine needs engine.key_secret, frontend.key and worker.key; a frontend needs engine.key and
frontend.key_secret; a worker engine.key and worker.key_secret. The engine admits on its frontend
sockets only the frontend key and on its worker socket only the worker key, so even a frontend's
keys cannot forge a worker. Without a keys directory the links are plain TCP, which the engine
accepts only on loopback unless --allow-unauthenticated says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared.engine_args import add_flag

log = logging.getLogger(__name__)

ROLES = ("engine", "frontend", "worker")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def generate_keys(directory: str | os.PathLike) -> list[Path]:
    """Write a fresh keypair per role into `directory` (created if missing); secrets are 0600.
    Refuses to overwrite existing keys, so a running stack is never locked out by accident."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    existing = [out / f"{role}{ext}" for role in ROLES for ext in (".key", ".key_secret")]
    if any(p.exists() for p in existing):
        raise ValueError(f"{out} already holds pagedserve keys; remove them first to make new ones")
    for role in ROLES:
        _, secret = zmq.auth.create_certificates(out, role)
        os.chmod(secret, 0o600)
    return existing


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = directory / (name + (".key_secret" if secret else ".key"))
    if not path.is_file() and not secret:
        path = directory / (name + ".key_secret")  # a secret file also holds the public key
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key {path}: {exc} (make keys with `pagedserve keys DIR`)") from exc
    if secret and not private:
        raise ValueError(f"{path} holds no secret key")
    return public, private


@dataclass(frozen=True)
class CurveClient:
    """A connecting socket's CURVE settings: its own keypair and the engine's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret
        sock.curve_serverkey = self.server_public


class _KeyCheck:
    """zmq.auth's credentials provider: admits the key allowed for a ZAP domain and logs each
    refused key once (a refused peer retries its handshake every fraction of a second)."""

    _MAX_LOGGED = 64

    def __init__(self, allowed: dict[str, bytes]):
        self.allowed = allowed  # ZAP domain -> z85 public key
        self._logged: set[tuple[str, bytes]] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if self.allowed.get(domain) == key:
            return True
        if (domain, key) not in self._logged and len(self._logged) < self._MAX_LOGGED:
            self._logged.add((domain, key))
            log.warning("refused a %s connection with an unknown CURVE key %s", domain, key.decode(errors="replace"))
        return False


class EngineAuth:
    """The engine's side: CURVE servers for its frontend and worker sockets, checked by one
    ThreadAuthenticator per zmq context, started before the first socket binds (libzmq admits
    every client while no ZAP handler runs)."""

    def __init__(self, public: bytes, secret: bytes, frontend_public: bytes, worker_public: bytes):
        self.public, self.secret = public, secret
        self._check = _KeyCheck({"frontend": frontend_public, "worker": worker_public})
        self._authenticators: dict[zmq.Context, ThreadAuthenticator] = {}
        self._lock = threading.Lock()
        self.frontends = CurveServer(self, "frontend")
        self.workers = CurveServer(self, "worker")

    def ensure_authenticator(self, ctx: zmq.Context) -> None:
        with self._lock:
            if ctx not in self._authenticators:
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("pagedserve.zap"))
                auth.start()
                for domain in self._check.allowed:
                    auth.configure_curve_callback(domain, self._check)
                self._authenticators[ctx] = auth

    def stop(self) -> None:
        """Stop the authenticator threads (before a context is terminated)."""
        with self._lock:
            for auth in self._authenticators.values():
                auth.stop()
            self._authenticators.clear()


@dataclass(frozen=True)
class CurveServer:
    """A binding socket's CURVE settings: the engine's keypair and the ZAP domain whose key it admits."""

    auth: EngineAuth
    domain: str

    def apply(self, sock: zmq.Socket) -> None:
        self.auth.ensure_authenticator(sock.context)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.auth.public, self.auth.secret
        sock.zap_domain = self.domain.encode()


Security = CurveClient | CurveServer


def _keys_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.curve_keys_dir) if getattr(args, "curve_keys_dir", None) else None


def client_security(args: argparse.Namespace, role: str) -> CurveClient | None:
    """The CURVE settings of a frontend's or worker's sockets, or None without a keys directory."""
    directory = _keys_dir(args)
    if directory is None:
        return None
    public, secret = _load(directory, role, secret=True)
    return CurveClient(public, secret, _load(directory, "engine", secret=False)[0])


def is_loopback(addr: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on a loopback interface."""
    m = re.match(r"tcp://(.+):[^:]+$", addr)
    return m is None or m.group(1) in _LOCAL_HOSTS or m.group(1).startswith("127.")


def engine_security(args: argparse.Namespace, addrs: list[str]) -> EngineAuth | None:
    """The engine's CURVE settings, or None without a keys directory; refuses (ValueError) to
    leave the links unauthenticated on an address beyond loopback unless told to."""
    directory = _keys_dir(args)
    if directory is None:
        exposed = [a for a in addrs if not is_loopback(a)]
        if exposed and not args.allow_unauthenticated:
            raise ValueError(
                f"binding {', '.join(exposed)} without authentication: give --curve-keys-dir "
                "(make keys with `pagedserve keys DIR`) or --allow-unauthenticated"
            )
        return None
    public, secret = _load(directory, "engine", secret=True)
    return EngineAuth(public, secret, _load(directory, "frontend", False)[0], _load(directory, "worker", False)[0])


def add_auth_args(parser: argparse.ArgumentParser, engine: bool = False) -> None:
    """--curve-keys-dir (every service) and, for the engine, --allow-unauthenticated."""
    add_flag(parser, "--curve-keys-dir", None, "directory of CURVE keys (`pagedserve keys DIR`); "
             "authenticates every engine link", kind=str)
    if engine:
        add_flag(parser, "--allow-unauthenticated", False,
                 "bind addresses beyond loopback without CURVE keys (anyone who reaches them can send messages)")
