"""Service processes for the deployment tests: each in its own session with its output in a log
file, dying with the test process however it dies, stopped and reaped on close; and waiting for
one to answer over HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from deploy_helpers import REPO

# Runs `python -m MODULE ARGS` after asking Linux to SIGTERM the child when the test process dies,
# however it dies, so no service outlives a killed test run.
_LAUNCHER = (
    "import ctypes, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'): ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


class Proc:
    """A process in its own session with its output in a log file; stopped and reaped on close."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @classmethod
    def python_module(cls, name: str, module: str, args: list[str], log_dir: Path, env: dict[str, str]) -> Proc:
        return cls(name, [sys.executable, "-c", _LAUNCHER, module, *args], log_dir, env)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def wait_http(url: str, procs: list[Proc], timeout: float, status: int = 200) -> None:
    """Poll `url` until it answers `status`; fail at once, with its log, if one of `procs` exits."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            resp = httpx.get(url, timeout=5)
            if resp.status_code == status:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.log(1500)}" for p in procs)
    raise TimeoutError(f"{url} did not answer {status} in {timeout:.0f}s (last: {last})\n{logs}")
