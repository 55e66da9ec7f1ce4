"""Parallel workers through the real stack: `pagedserve serve --tensor-parallel-size 2` (gloo on
CPU) answers greedy requests with exactly the tokens one rank produces offline."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
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


def test_serve_tensor_parallel_matches_one_rank(model_dirs, one_rank):
    port = free_port()
    proc = start_serve(str(model_dirs("llama")), port, "--tensor-parallel-size", "2", "--kv-cache-memory",
                       str(8 << 20), "--return-tokens-as-token-ids")
    try:
        wait_line(proc, "serving", timeout_s=180)
        assert served_tokens(port) == one_rank
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
