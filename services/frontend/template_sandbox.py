"""Chat templates sent by clients (trusted only with --trust-request-chat-template) render here:
in a child process, in a Jinja sandbox that also bounds string and list repetition, under a
memory limit, and killed when it overruns its deadline. So a template that loops for ever or
builds a gigabyte answers 400 quickly, and the frontend's own process never runs it.

The child is this file run as a script (stdlib and jinja2 only): one JSON request per line on
stdin, one JSON answer per line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

MAX_REPEAT = 1 << 20  # the longest string or list one `*` may build in a template
MAX_EXPONENT = 1000
CHILD_MEMORY_BYTES = 1 << 30  # address space of the child, whatever the template allocates


class TemplateRejected(ValueError):
    """The client's template failed, overran its deadline or built too much; the message says which."""


class TemplateSandbox:
    """One child process rendering one template at a time; started on first use and again after
    each kill."""

    def __init__(self, timeout_s: float, max_bytes: int):
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def render(self, template: str, context: dict[str, Any]) -> str:
        """``template`` rendered with ``context``; TemplateRejected when it fails, takes longer
        than the deadline or renders more than ``max_bytes``."""
        request = {"template": template, "context": context, "max_bytes": self.max_bytes}
        async with self._lock:
            proc = await self._process()
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            try:
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
            except asyncio.TimeoutError:
                await self.close()
                raise TemplateRejected(f"the chat template took longer than {self.timeout_s:g} s to render") from None
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                line = b""
            except BaseException:  # cancelled (the client left): the answer it still owes must not
                self._discard()  # reach the next request
                raise
            if not line:  # the child died (out of memory, killed) or answered more than asked
                await self.close()
                raise TemplateRejected("the chat template exhausted the renderer's memory")
        answer = json.loads(line)
        if "error" in answer:
            raise TemplateRejected(answer["error"])
        return answer["text"]

    async def _process(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", __file__, str(os.getpid()), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=6 * self.max_bytes + (1 << 16),  # an answer's line: JSON escapes take up to 6 bytes a byte
            )
        return self._proc

    def _discard(self) -> asyncio.subprocess.Process | None:
        """Kill the child now (its exit is reaped in the background); the next render starts another."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
        return proc

    async def close(self) -> None:
        proc = self._discard()
        if proc is not None:
            await proc.wait()


# ----- the child --------------------------------------------------------------------------------


def _environment():
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "*":
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"'*' would build {len(seq) * times} items (at most {MAX_REPEAT})")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _render(env: Any, request: dict[str, Any]) -> dict[str, str]:
    try:
        text = env.from_string(request["template"]).render(**request["context"])
    except MemoryError:
        return {"error": "the chat template exhausted the renderer's memory"}
    except Exception as exc:  # noqa: BLE001 (any failure of the client's template is the client's error)
        return {"error": f"the chat template could not render these messages: {type(exc).__name__}: {exc}"}
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate ('\ud800' in the template): no tokenizer takes it
        return {"error": "the chat template rendered text that is not valid Unicode (a lone surrogate)"}
    if size > request["max_bytes"]:
        return {"error": f"the chat template rendered more than {request['max_bytes']} bytes"}
    return {"text": text}


def _serve() -> None:
    import resource
    import signal

    if sys.platform.startswith("linux"):  # a template still looping must not outlive its frontend
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != int(sys.argv[1]):  # the frontend died before that
            return
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    env = _environment()
    for line in sys.stdin.buffer:
        answer = _render(env, json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
