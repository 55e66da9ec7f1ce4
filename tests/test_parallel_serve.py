"""Parallel workers through the real stack (gloo on CPU): `pagedserve serve -tp 2 -pp 2`, and
pipeline stages started as separate processes that meet at an address given by flags or by
torchrun's variables, answer greedy requests with exactly the tokens one rank produces offline.
A rank whose peers never come fails with a clear error within --dist-timeout."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

import pytest
from service_helpers import stop_processes
from test_recovery import spawn, wait_healthy
from test_serve import start_serve, wait_line

from pagedserve import LLM, SamplingParams
from pagedserve.serve import free_port

PROMPTS = [[11, 12, 13, 14], [40, 41], list(range(50, 80))]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def one_rank(model_dirs) -> list[list[int]]:
    """Greedy tokens of one rank, offline."""
    llm = LLM(str(model_dirs("llama")), max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def served_tokens(port: int) -> list[list[int]]:
    """Greedy tokens the stack on ``port`` answers for PROMPTS (logprobs name each token)."""
    model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10))["data"][0]["id"]
    got = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            tokens = json.load(resp)["choices"][0]["logprobs"]["tokens"]
        got.append([int(t.removeprefix("token_id:")) for t in tokens])
    return got


def test_serve_tensor_x_pipeline_parallel_matches_one_rank(model_dirs, one_rank):
    """Two pipeline stages of two tensor-parallel ranks each: four workers, speculating with a
    draft model (the model itself: sharded over the last stage's two ranks, every proposal is
    accepted) and giving one rank's tokens without speculation."""
    port, metrics_port, model = free_port(), free_port(), str(model_dirs("llama"))
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 3, "draft_cost": 0}
    proc = start_serve(model, port, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                       "--kv-cache-memory", str(8 << 20), "--return-tokens-as-token-ids",
                       "--speculative-config", json.dumps(spec), "--engine-metrics-port", str(metrics_port))
    try:
        wait_line(proc, "serving", timeout_s=180)
        assert served_tokens(port) == one_rank
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        drafted, accepted = (_counter(text, f"pagedserve_engine_spec_decode_num_{name}_tokens_total")
                             for name in ("draft", "accepted"))
        assert accepted == drafted > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _counter(metrics: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))


# ----- ranks as separate processes, meeting at an address given by flags or environment -----------

FLAGS = ("--max-model-len", "256", "--kv-cache-memory", str(8 << 20), "--pipeline-parallel-size", "2")


def test_ranks_started_apart_rendezvous_by_flags_and_torchrun_variables(model_dirs, one_rank):
    """Two pipeline stages as separate workers, as on two hosts."""
    model, dist = str(model_dirs("llama")), f"127.0.0.1:{free_port()}"
    inp, out, wrk = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    port = free_port()
    procs = [
        spawn("engine", "--model", model, *FLAGS, "--frontend-input", inp, "--frontend-output", out,
              "--worker-addr", wrk, "--metrics-port", "0"),
        # node 1 of 2 by flags; rank 0 by torchrun's variables
        spawn("worker", "--model", model, *FLAGS, "--worker-addr", wrk, "--metrics-port", "0", "--nnodes", "2",
              "--node-rank", "1", "--dist-init-addr", dist),
        spawn("worker", "--model", model, *FLAGS, "--worker-addr", wrk, "--metrics-port", "0",
              env_extra={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": dist.split(":")[1], "WORLD_SIZE": "2",
                         "RANK": "0"}),
        spawn("frontend", "--engine-input", inp, "--engine-output", out, "--port", str(port), "--metrics-port", "0",
              "--return-tokens-as-token-ids"),
    ]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=180)
        assert served_tokens(port) == one_rank
    finally:
        stop_processes(procs)


def _worker_exit(*flags: str) -> tuple[int, str]:
    """A worker run with these flags until it exits (within 120 s): its status and stderr."""
    proc = spawn("worker", *flags, "--metrics-port", "0", stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_a_rank_that_never_joins_fails_with_a_clear_error_within_the_timeout(model_dirs):
    # rank 0 of 2 waits at its address; rank 1 never comes (a hang would trip communicate's timeout)
    status, err = _worker_exit("--model", str(model_dirs("llama")), *FLAGS, "--rank", "0",
                               "--dist-init-addr", f"127.0.0.1:{free_port()}", "--dist-timeout", "3")
    assert status == 1
    assert "rank 0 of 2: the ranks did not all join" in err and "within 3s (--dist-timeout)" in err, err[-2000:]


def test_a_worker_given_a_device_this_machine_lacks_exits_with_a_clear_error(model_dirs):
    status, err = _worker_exit("--model", str(model_dirs("llama")), "--device", "cuda:64")
    assert status == 2
    assert "pagedserve: error: device 'cuda:64' is not there" in err, err[-2000:]
