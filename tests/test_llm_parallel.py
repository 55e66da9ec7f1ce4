"""The offline LLM over several ranks (gloo on CPU): LLM(tensor_parallel_size=2),
LLM(pipeline_parallel_size=2) and both give one rank's greedy tokens and logprobs; the rank
processes stop with the LLM (``with``, ``del``, interpreter exit, the parent killed), and a rank
that cannot start is named with its error."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pagedserve import LLM, SamplingParams

PROMPTS = [[11, 12, 13, 14], [40, 41], list(range(50, 80))]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
SMALL = {"max_model_len": 128, "kv_cache_memory": 8 << 20}


@pytest.fixture(scope="module")
def llama(model_dirs) -> str:
    return str(model_dirs("llama"))


@pytest.fixture(scope="module")
def one_rank(llama):
    return LLM(llama, **SMALL).generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)


def _running(pids: list[int]) -> list[int]:
    """Those of pids still running (a zombie counts as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _gone_within(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while _running(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _running(pids)


@pytest.mark.parametrize(("tp", "pp", "close"), [(2, 1, "del"), (1, 2, "with"), (2, 2, "with")],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_ranks_give_one_ranks_tokens_and_logprobs(llama, one_rank, tp, pp, close):
    llm = LLM(llama, tensor_parallel_size=tp, pipeline_parallel_size=pp, **SMALL)
    with llm if close == "with" else contextlib.nullcontext():
        pids = llm.runner.pids()
        assert len(_running(pids)) == tp * pp
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    if close == "del":
        os.kill(pids[-1], signal.SIGKILL)  # a rank lost between calls fails the next one at once, named
        with pytest.raises(RuntimeError, match=rf"worker rank {tp * pp - 1} \(pid {pids[-1]}\) exited with code -9"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], PARAMS, use_tqdm=False)
        del llm  # no gc.collect(): nothing holds the rank processes in a reference cycle
    assert _gone_within(pids, 10) == []
    if close == "with":
        with pytest.raises(RuntimeError, match="this LLM has been shut down"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], PARAMS, use_tqdm=False)
    for ours, ref in zip(got, one_rank):
        out, expected = ours.outputs[0], ref.outputs[0]
        assert out.token_ids == expected.token_ids
        assert out.finish_reason == expected.finish_reason == "length"
        for position, (mine, theirs) in enumerate(zip(out.logprobs, expected.logprobs)):
            assert mine.keys() == theirs.keys(), position
            for token, lp in mine.items():
                assert lp.logprob == pytest.approx(theirs[token].logprob, abs=1e-4), (position, token)
                assert lp.rank == theirs[token].rank


def test_a_rank_that_cannot_load_its_weights_is_named_with_its_error(llama, tmp_path):
    broken = shutil.copytree(llama, tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker rank \d \(pid \d+\) exited with code 1: .*") as info:
        LLM(str(broken), tensor_parallel_size=2, **SMALL)
    assert time.monotonic() - start < 120
    assert "safetensors" in str(info.value).lower() or "header" in str(info.value).lower(), info.value


def test_ranks_that_do_not_report_in_time_fail_the_start_and_are_stopped(llama, monkeypatch, tmp_path):
    # the weights are a FIFO no one writes: each rank blocks opening it, however fast the machine
    slow = shutil.copytree(llama, tmp_path / "slow")
    for weights in slow.glob("*.safetensors"):
        weights.unlink()
        os.mkfifo(weights)
    monkeypatch.setenv("PAGEDSERVE_RANK_START_TIMEOUT", "0.5")
    before = _ranks()
    with pytest.raises(RuntimeError, match=r"worker rank\(s\) \[0, 1\] did not start within 0.5s"):
        LLM(str(slow), tensor_parallel_size=2, **SMALL)
    assert _gone_within(sorted(_ranks() - before), 10) == []


def _ranks() -> set[int]:
    """The rank processes of this process's LLMs: the fork server's children."""
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True) if p.ppid() != me.pid}


SCRIPT = """
import os, sys
from pagedserve import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=128, kv_cache_memory=8 << 20)
print(*llm.runner.pids(), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), 9)
"""


@pytest.fixture(scope="module")
def interpreters(llama) -> Iterator[dict[str, subprocess.Popen]]:
    """One interpreter per ending, started together: each spends seconds on imports on a core of its own."""
    procs = {end: subprocess.Popen([sys.executable, "-c", SCRIPT, llama, end], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for end in ("exit", "kill")}
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_no_rank_outlives_its_interpreter(interpreters, end):
    """The interpreter exits without shutting the LLM down, or is killed: its ranks go too."""
    proc = interpreters[end]
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == (0 if end == "exit" else -9), stderr[-3000:]
    pids = [int(p) for p in stdout.split()]
    assert len(pids) == 2
    assert _gone_within(pids, 10) == []
