"""vLLM's module entry point with a vLLM-style launch: `python -m pagedserve.entrypoints.openai.api_server
--model M --config FILE.yaml ...` runs the whole stack, over HTTPS, and every flag has vLLM's meaning
as a client sees it: the chat template, the response role, tokens as ids, the generation-config
override, request logs, CORS, the root path, /v1/models' fields; the command line wins over the file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagedserve.serve import free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


def _cert(tmp: Path) -> tuple[str, str]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(key), str(cert)


@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_server")
    key, cert = _cert(tmp)
    config = tmp / "serve.yaml"
    config.write_text(f"""
model: {model_dirs("llama")}
max_model_len: 200            # the command line's 128 wins
served-model-name: [tiny, alias]
disable-custom-all-reduce: true   # what pagedserve does anyway
response-role: bot
return-tokens-as-token-ids: true
override-generation-config: {{"max_new_tokens": 3}}
enable-log-requests: true
allowed-origins: ["http://ok.example"]
root-path: /llm
ssl-keyfile: {key}
ssl-certfile: {cert}
uvicorn-log-level: warning
""")
    port = free_port()
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--config", str(config),
           "--max-model-len", "128", "--chat-template", TEMPLATE, "--port", str(port), "--engine-metrics-port",
           str(free_port()), "--worker-metrics-port", str(free_port()), "--frontend-metrics-port", "0",
           "--ready-timeout", "180"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="INFO"))
    client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=cert), timeout=60)
    try:
        deadline = time.monotonic() + 200
        while "pagedserve: serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield client, log, "alias"
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_models_report_vllm_fields_and_command_line_wins(stack, model_dirs):
    client, log, model = stack
    assert f"https://127.0.0.1:{client.base_url.port}/llm/v1" in log.read_text()
    cards = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in cards] == ["tiny", model]
    for card in cards:
        assert card["root"] == str(model_dirs("llama")) and card["owned_by"] == "pagedserve" and card["max_model_len"] == 128


def test_chat_uses_server_template_and_response_role(stack):
    client, _, model = stack
    by_messages = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    by_text = client.post("/tokenize", json={"prompt": "<<hi>>", "add_special_tokens": False}).json()
    assert by_messages["tokens"] == by_text["tokens"]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"]["role"] == "bot"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
    assert '"role":"bot"' in first.replace(" ", "")


def test_logprob_tokens_are_token_ids(stack):
    client, _, model = stack
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert re.fullmatch(r"token_id:\d+", entry["token"]) and entry["bytes"] == list(entry["token"].encode())
        assert all(re.fullmatch(r"token_id:\d+", top["token"]) for top in entry["top_logprobs"])


def test_generation_config_override_sets_default_max_tokens(stack):
    client, _, model = stack
    out = client.post("/v1/completions", json={"model": model, "prompt": "hello", "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 3  # the override's max_new_tokens, not completions' 16
    out = client.post("/v1/completions", json={"model": model, "prompt": "hello", "ignore_eos": True,
                                               "max_tokens": 5}).json()
    assert out["usage"]["completion_tokens"] == 5  # a request's own value wins


def test_requests_are_logged(stack):
    client, log, model = stack
    client.post("/v1/completions", json={"model": model, "prompt": "hello log", "max_tokens": 1})
    deadline = time.monotonic() + 10
    while "Received request on /v1/completions" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_cors_allows_only_the_given_origins(stack):
    client, _, _ = stack
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = client.options("/v1/completions", headers={"Origin": "http://ok.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
    bad = client.options("/v1/completions", headers={"Origin": "http://evil.example", **preflight})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_root_path_is_the_apps(stack):
    client, _, _ = stack
    spec = client.get("/openapi.json").json()
    assert spec["servers"] == [{"url": "/llm"}]
