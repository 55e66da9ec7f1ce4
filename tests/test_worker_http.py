"""The issue's reproducers over HTTP, against `pagedserve serve`: structured-outputs requests whose
grammar completes long before max_tokens (with ignore_eos, or min_tokens past what the grammar
allows) answer 200 with finish_reason "stop", json_object answers an object, a request left with
nothing to sample answers 400, and a stream running beside them all ends with [DONE] and the text
it has alone."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_helpers import sse_events
from test_serve import start_serve, wait_line

from pagedserve.serve import free_port

CASES = {
    "regex": {"guided_regex": "a", "ignore_eos": True, "max_tokens": 5},
    "choice": {"guided_choice": ["yes", "no"], "ignore_eos": True, "max_tokens": 5},
    "min_tokens": {"guided_choice": ["yes", "no"], "min_tokens": 4, "max_tokens": 5},
    "json_object": {"response_format": {"type": "json_object"}, "max_tokens": 30, "temperature": 0},
    "nothing_to_sample": {"guided_grammar": "root ::= root", "max_tokens": 5},
}


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def streamed_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def completions(model_dirs):
    port = free_port()
    proc = start_serve(str(model_dirs("llama")), port, "--max-model-len", "1024")
    try:
        wait_line(proc, "serving")
        yield f"http://127.0.0.1:{port}/v1/completions"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_grammar_edges_answer_alone_beside_a_stream(completions):
    stream = {"prompt": "hello there", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    alone = sse_events(completions, stream)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(sse_events, completions, stream, started)
        assert started.wait(60)
        answers = {name: post(completions, {"prompt": "x", **body}) for name, body in CASES.items()}
        beside = pending.result(timeout=300)
    assert beside[-1] == "[DONE]" and streamed_text(beside) == streamed_text(alone)
    assert answers["regex"][0] == 200 and answers["regex"][1]["choices"][0]["text"] == "a"
    for name in ("regex", "choice", "min_tokens", "json_object"):
        status, body = answers[name]
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop", (name, body)
    for name in ("choice", "min_tokens"):
        assert answers[name][1]["choices"][0]["text"] in ("yes", "no")
    assert isinstance(json.loads(answers["json_object"][1]["choices"][0]["text"]), dict)
    status, body = answers["nothing_to_sample"]
    assert status == 400 and body["error"]["message"].startswith("no token can be sampled")
