"""`pagedserve serve`'s watch over its children once the stack serves: each replica recovers on
its own while the others keep serving.

- A replica's engine dies: a new engine starts on the same addresses; the replica's workers
  introduce themselves to it, and the frontends resubmit the requests they had open there.
- A replica's worker dies: all of the replica's workers start anew, with a new rendezvous (a
  tensor- or pipeline-parallel group cannot take in one new rank, and its survivors may be stuck
  in a collective with the dead one); the engine recomputes the requests it holds once they
  are back.
- A frontend dies: the stack stops (serve exits non-zero, naming it).

A group that dies again within RESTART_WINDOW_S of its restart waits longer before each new
one (1, 2, 4 ... up to 30 s), so a replica that cannot start does not spin.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

RESTART_WINDOW_S = 30.0
MAX_DELAY_S = 30.0
_STOP_GRACE_S = 3.0  # survivors of a dead group may be stuck in a collective: SIGKILL after this

# A child: its name, its command, and the environment variables it gets beyond ours.
Child = tuple[str, list[str], dict[str, str]]
Start = Callable[[list[str], dict[str, str]], subprocess.Popen]


def group_of(name: str, names: list[str]) -> list[str]:
    """The children restarted together with ``name``: an engine alone, a worker with every worker
    of its replica ("worker-R" for one replica, "worker-D-R" for replica D of several)."""
    if not name.startswith("worker"):
        return [name]
    prefix = name.rsplit("-", 1)[0] + "-"
    return sorted(n for n in names if n.startswith(prefix) and n.count("-") == name.count("-"))


class Supervisor:
    """Starts the children and restarts a replica's engine or workers when they die (``check``)."""

    def __init__(self, children: list[Child], start: Start):
        self.commands = {name: (cmd, env) for name, cmd, env in children}
        self.start = start
        self.procs: dict[str, subprocess.Popen] = {name: start(cmd, env) for name, cmd, env in children}
        self.restarts = 0
        self._due: dict[str, float] = {}  # a dead group's first name -> when it starts again
        self._restarted: dict[str, float] = {}  # a group's first name -> when it last started again
        self._delay: dict[str, float] = {}

    def check(self) -> str | None:
        """Restart the groups whose time has come, and stop and schedule those that died; returns
        the name of a frontend that died (the stack must stop), else None."""
        now = time.monotonic()
        for name, proc in self.procs.items():
            if proc.poll() is None:
                continue
            if name.startswith("frontend"):
                return name
            group = group_of(name, list(self.procs))
            if group[0] in self._due:
                continue
            delay = self._backoff(group[0], now)
            print(f"pagedserve: {name} exited with code {proc.returncode}; restarting {', '.join(group)}"
                  + (f" in {delay:g}s" if delay else ""), file=sys.stderr, flush=True)
            _stop_now([self.procs[n] for n in group])
            self._due[group[0]] = now + delay
        for first, due in list(self._due.items()):
            if now >= due:
                del self._due[first]
                self._restart(group_of(first, list(self.procs)))
        return None

    def _backoff(self, first: str, now: float) -> float:
        if now - self._restarted.get(first, -RESTART_WINDOW_S) >= RESTART_WINDOW_S:
            self._delay[first] = 0.0  # it ran a good while: restart at once
        else:
            self._delay[first] = min(MAX_DELAY_S, max(1.0, 2 * self._delay.get(first, 0.0)))
        return self._delay[first]

    def _restart(self, group: list[str]) -> None:
        rendezvous = _fresh_rendezvous()  # shared by the group's ranks
        for name in group:
            cmd, env = self.commands[name]
            if "--dist-init-addr" in cmd:
                cmd = cmd.copy()
                cmd[cmd.index("--dist-init-addr") + 1] = rendezvous
                self.commands[name] = (cmd, env)
            self.procs[name] = self.start(cmd, env)
        self._restarted[group[0]] = time.monotonic()
        self.restarts += 1


def _fresh_rendezvous() -> str:
    from pagedserve.serve import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def _stop_now(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
