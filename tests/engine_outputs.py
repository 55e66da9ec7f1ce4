"""Driving an offline EngineCore to the end and comparing what two runs produced."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.engine.core import EngineCore


def collect_outputs(engine: EngineCore, after_step: Callable[[EngineCore], None] | None = None) -> dict:
    """Step until every request finished: per request its tokens, logprobs (ids, values, rank),
    prompt logprobs (ids, values) and (finish_reason, stop_reason, error). No output may follow
    a finish. after_step: called after every step (invariants to check)."""
    out: dict = {}
    while engine.has_unfinished():
        for d in engine.step():
            got = out.setdefault(d.req_id, {"tokens": [], "logprobs": [], "prompt": [], "finish": None})
            assert got["finish"] is None, f"{d.req_id} got output after it finished"
            got["tokens"] += d.new_token_ids
            got["logprobs"] += [(lp.token_ids, lp.logprobs, lp.rank) for lp in d.new_logprobs]
            got["prompt"] += [(lp.token_ids, lp.logprobs) for lp in d.prompt_logprobs]
            if d.finish_reason is not None:
                got["finish"] = (d.finish_reason, d.stop_reason, d.error)
        if after_step is not None:
            after_step(engine)
    return out


def assert_same_outputs(a: dict, b: dict) -> None:
    """The same tokens, finishes and ranks; logprobs within 1e-4."""
    assert a.keys() == b.keys()
    for rid, x in a.items():
        y = b[rid]
        assert (x["tokens"], x["finish"]) == (y["tokens"], y["finish"]), rid
        for key in ("logprobs", "prompt"):
            assert len(x[key]) == len(y[key]), rid
            for p, q in zip(x[key], y[key]):
                assert p[0] == q[0] and p[2:] == q[2:] and p[1] == pytest.approx(q[1], abs=1e-4), rid
