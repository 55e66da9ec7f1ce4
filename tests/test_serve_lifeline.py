"""`pagedserve serve` killed outright (SIGKILL, no chance to stop anything): its engine, worker
and frontends, which run in sessions of their own, end by themselves (pagedserve/lifeline.py)."""

from __future__ import annotations

import psutil
from test_serve import children, start_serve, wait_line

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
