"""A scripted engine for frontend tests: the real protocol over real ZeroMQ sockets (two bound
ROUTERs), no model. Each request "generates" the tokens of a fixed script, one per step, from a
position given by its prompt and seed, so outputs are deterministic and known in advance.

It records what the frontends asked for (added, aborted, goodbyes) and can be paused (no steps,
no pongs: an engine that hangs) or told to refuse the next request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq
from typing_extensions import Self

from shared.protocol import (
    AbortRequests,
    AddRequest,
    EngineMessage,
    FrontendMessage,
    Goodbye,
    Hello,
    ModelInfo,
    Outputs,
    Ping,
    Pong,
    RequestDelta,
    RequestFailed,
    TokenLogprobs,
)
from shared.transport import RouterQueue


@dataclass
class _Running:
    identity: bytes
    req: AddRequest
    max_tokens: int
    start: int
    produced: list[int] = field(default_factory=list)


class FakeEngine:
    def __init__(self, model_path: str, script: list[int], *, max_model_len: int = 128, vocab_size: int = 512,
                 eos_token_id: int = 1, step_s: float = 0.002, generation_defaults: dict | None = None,
                 input_addr: str = "tcp://127.0.0.1:*", output_addr: str = "tcp://127.0.0.1:*"):
        self.model_path, self.script = model_path, script
        self.max_model_len, self.vocab_size, self.eos = max_model_len, vocab_size, eos_token_id
        self.step_s = step_s
        self.generation_defaults = generation_defaults or {}
        self.ctx = zmq.Context()
        self.input: RouterQueue = RouterQueue(self.ctx, input_addr, FrontendMessage, EngineMessage)
        self.output: RouterQueue = RouterQueue(self.ctx, output_addr, FrontendMessage, EngineMessage)
        self.input_addr = self.input.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.output_addr = self.output.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.running: dict[str, _Running] = {}
        self.added: list[AddRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.goodbyes: list[str] = []
        self.hellos: set[str] = set()
        self.paused = threading.Event()
        self.refuse_next: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.input.close()
        self.output.close()
        self.ctx.term()

    def model_info(self) -> ModelInfo:
        return ModelInfo("fake-model", self.model_path, self.max_model_len, self.vocab_size, [self.eos],
                         generation_defaults=self.generation_defaults)

    def next_tokens(self, prompt: list[int], seed: int | None, count: int) -> list[int]:
        """What a request with this prompt and seed generates (ignoring stops)."""
        start = (sum(prompt) + (seed or 0)) % len(self.script)
        return [self.script[(start + i) % len(self.script)] for i in range(count)]

    # ----- loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = self.input.recv(timeout_ms=int(self.step_s * 1000) or 1)
            while got is not None:
                self._handle(*got)
                got = self.input.recv(timeout_ms=0)
            if not self.paused.is_set():
                self._step()

    def _handle(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, Hello):
            self.hellos.add(msg.frontend_id)
            self.output.send(identity, self.model_info())
        elif isinstance(msg, Ping):
            if not self.paused.is_set():
                self.output.send(identity, Pong(msg.ping_id, len(self.running), 0))
        elif isinstance(msg, AddRequest):
            self._add(identity, msg)
        elif isinstance(msg, AbortRequests):
            deltas = []
            for req_id in msg.req_ids:
                if self.running.pop(req_id, None) is not None:
                    self.aborted.append(req_id)
                    deltas.append(RequestDelta(req_id, [], finish_reason="abort"))
            if deltas:
                self.output.send(identity, Outputs(deltas))
        elif isinstance(msg, Goodbye):
            self.goodbyes.append(msg.frontend_id)
            for req_id in [r for r, run in self.running.items() if run.identity == identity]:
                del self.running[req_id]

    def _add(self, identity: bytes, msg: AddRequest) -> None:
        self.added.append(msg)
        if self.refuse_next is not None:
            self.output.send(identity, RequestFailed(msg.req_id, self.refuse_next, 400))
            self.refuse_next = None
            return
        prompt = msg.prompt_token_ids.tolist()
        room = self.max_model_len - len(prompt)
        limit = msg.sampling_params.max_tokens
        start = (sum(prompt) + (msg.sampling_params.seed or 0)) % len(self.script)
        self.running[msg.req_id] = _Running(identity, msg, room if limit is None else min(limit, room), start)

    def _step(self) -> None:
        by_peer: dict[bytes, list[RequestDelta]] = {}
        for req_id, run in list(self.running.items()):
            params = run.req.sampling_params
            token = self.script[(run.start + len(run.produced)) % len(self.script)]
            run.produced.append(token)
            delta = RequestDelta(req_id, [token], num_cached_tokens=0)
            if params.logprobs is not None:
                top = [(token + k + 1) % self.vocab_size for k in range(params.logprobs)]
                delta.new_logprobs = [TokenLogprobs([token, *top], [-0.25, *[-1.0 - k for k in range(len(top))]], 1)]
            n = len(run.produced)
            if n >= params.min_tokens and (token in params.stop_token_ids or (token == self.eos and not params.ignore_eos)):
                delta.finish_reason = "stop"
                delta.stop_reason = token if token in params.stop_token_ids else None
            elif n >= run.max_tokens:
                delta.finish_reason = "length"
            if delta.finish_reason is not None:
                del self.running[req_id]
                self.finished.append(req_id)
            by_peer.setdefault(run.identity, []).append(delta)
        for identity, deltas in by_peer.items():
            self.output.send(identity, Outputs(deltas))

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()
