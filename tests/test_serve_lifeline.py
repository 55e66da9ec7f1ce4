"""`pagedserve serve` killed outright (SIGKILL, no chance to stop anything): its engine, worker
and frontends, which run in sessions of their own, end by themselves (pagedserve/lifeline.py)."""

from __future__ import annotations

import os
import threading

import psutil
import pytest
from test_serve import children, start_serve, wait_line

from pagedserve import lifeline
from pagedserve.serve import free_port


def test_children_end_when_serve_is_killed(model_dirs):
    port, kids = free_port(), []
    proc = start_serve(str(model_dirs("llama")), port, "--frontends", "1")
    try:
        wait_line(proc, "serving")
        kids = children(proc)
        assert len(kids) >= 3  # engine, worker, frontend
        proc.kill()
        proc.wait(10)
        _, alive = psutil.wait_procs(kids, timeout=45)
        assert not alive, [k.cmdline()[3:5] for k in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for kid in kids:  # this test's own, should the assertion have failed
            if kid.is_running():
                kid.kill()


@pytest.mark.parametrize("value", ["abc", "99999", str(2**64), "-1", "\udcff", "file"])
def test_a_lifeline_that_is_not_an_open_pipe_is_ignored(monkeypatch, tmp_path, value):
    """A wrong PAGEDSERVE_LIFELINE_FD (not a number, a closed descriptor, a regular file) starts no
    watch, which would otherwise stop this process at once; it is removed from the environment."""
    with open(tmp_path / "f", "w") as f:
        monkeypatch.setenv(lifeline.ENV, str(f.fileno()) if value == "file" else value)
        lifeline.watch()
    assert lifeline.ENV not in os.environ
    assert not any(t.name == "lifeline" for t in threading.enumerate())
