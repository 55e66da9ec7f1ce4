"""`pagedserve serve`'s children end when serve does, even when serve is killed outright.

serve opens a pipe and keeps its write end; each child gets the read end (its descriptor number in
PAGEDSERVE_LIFELINE_FD) and a thread that blocks reading it. Nothing is ever written: the read
returns only when the last write end closes, that is when serve's process is gone, however it
ended. The child then stops as on SIGTERM (its own graceful shutdown), and exits outright if
that has not ended it within GRACE_S. The children run in sessions of their own (serve stops
them in order), so without this a SIGKILLed serve would leave them running.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time

log = logging.getLogger(__name__)
ENV = "PAGEDSERVE_LIFELINE_FD"
GRACE_S = 30.0


def open_pipe() -> tuple[int, int]:
    """(read end for the children, write end serve keeps open for as long as it lives)."""
    return os.pipe()


def child_env(read_fd: int) -> dict[str, str]:
    return {ENV: str(read_fd)}


def watch() -> None:
    """In a child: start the watch if serve passed a lifeline (a no-op otherwise). The variable is
    removed, so this process's own children do not take the descriptor for theirs."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return
    try:  # only serve sets it; anything but an open pipe is ignored, not a reason to stop
        fd = int(value)
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OverflowError, OSError):
        is_pipe = False
    if not is_pipe:
        log.warning("%s=%r is not an open pipe; ignored", ENV, value)
        return
    threading.Thread(target=_wait, args=(fd,), daemon=True, name="lifeline").start()


def _wait(fd: int) -> None:
    try:
        while os.read(fd, 1):  # never written: b"" (end of file) once serve is gone
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
