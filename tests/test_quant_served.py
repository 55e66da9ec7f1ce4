"""Quantization through the served stack: `pagedserve serve --kv-cache-dtype fp8 --quantization int8`
answers with exactly the tokens (and logprobs) of the offline LLM under the same settings, and a
quantization the checkpoint cannot run stops serve at startup, naming it."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

from test_serve import start_serve, wait_line

from pagedserve import LLM, SamplingParams
from pagedserve.serve import free_port

PROMPTS = [[(7 * i + 13 * j) % 1000 + 10 for j in range(12 + 9 * i)] for i in range(3)]
FLAGS = ("--kv-cache-dtype", "fp8", "--quantization", "int8")


def _complete(port: int, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["choices"][0]


def test_fp8_kv_and_int8_weights_serve_the_offline_tokens(model_dirs):
    path = str(model_dirs("llama"))
    port = free_port()
    proc = start_serve(path, port, *FLAGS, "--return-tokens-as-token-ids")
    try:
        wait_line(proc, "serving")
        model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
        served = [_complete(port, model, prompt) for prompt in PROMPTS]
    finally:
        proc.send_signal(signal.SIGTERM)  # serve stops its children; a SIGKILL would orphan them
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    llm = LLM(path, kv_cache_dtype="fp8", quantization="int8", max_model_len=256)
    offline = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=8, temperature=0, logprobs=1), use_tqdm=False)
    for choice, out in zip(served, offline):
        got = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert got == list(out.outputs[0].token_ids)
        want = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        assert all(abs(a - b) < 1e-4 for a, b in zip(choice["logprobs"]["token_logprobs"], want))


def test_a_quantization_the_checkpoint_lacks_stops_serve_naming_it(model_dirs):
    proc = start_serve(str(model_dirs("llama")), free_port(), "--quantization", "gptq")
    try:
        assert proc.wait(120) != 0
        assert "quantization gptq needs a checkpoint quantized so" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
