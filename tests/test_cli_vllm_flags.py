"""vLLM launch-script flags that `pagedserve serve` refuses before it starts anything, run as the
real command: a vLLM flag pagedserve does not implement fails with a message saying so (also from
a --config file), an unknown flag gets argparse's error, bad values name the flag; a value that
asks for what pagedserve does anyway is accepted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# --ready-timeout 0 stops a stack that got past the checks at once: these tests want only the checks
_FAST = ["--ready-timeout", "0", "--port", "1", "--engine-metrics-port", "0", "--worker-metrics-port", "0",
         "--frontend-metrics-port", "0"]


def serve(*args: str, module: str = "pagedserve.cli", **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *(["serve"] if module == "pagedserve.cli" else []), *args]
    env = dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING", **env)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("flags", [
    ["--enable-sleep-mode"],
    ["--no-enable-chunked-prefill"],
    ["--logprobs-mode", "processed_logprobs"],
    ["--skip-tokenizer-init"],
])
def test_unsupported_vllm_flags_fail_saying_so(flags, model_dirs):
    out = serve(str(model_dirs("llama")), *flags, *_FAST)
    assert out.returncode == 2
    assert f"{flags[0].split('=')[0]} is a vLLM flag that pagedserve does not support yet" in out.stderr


def test_unsupported_switch_before_the_model_names_the_switch(model_dirs):
    out = serve("--enable-sleep-mode", str(model_dirs("llama")), *_FAST)
    assert out.returncode == 2 and "--enable-sleep-mode is a vLLM flag that pagedserve does not support yet" in out.stderr


def test_unknown_flag_gets_argparse_error(model_dirs):
    out = serve(str(model_dirs("llama")), "--no-such-flag", "3", *_FAST)
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-flag 3" in out.stderr


def test_unsupported_flag_in_config_file_fails(tmp_path, model_dirs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dirs('llama')}\nenable_sleep_mode: true\n")
    out = serve("--config", str(cfg), *_FAST)
    assert out.returncode == 2 and "--enable-sleep-mode is a vLLM flag that pagedserve does not support yet" in out.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--chat-template", "no/such/template.jinja"], "looks like a file path, but it could not be read"),
    (["--chat-template", "{% if %}"], "--chat-template does not compile"),
    (["--override-generation-config", '{"temperature": -1}'], "temperature must be non-negative"),
    (["--override-generation-config", '{"temprature": 0.5}'], "unsupported key(s) ['temprature']"),
    (["--override-generation-config", "[1]"], "must be a JSON object"),
    (["--generation-config", "/no/such/folder"], "generation_config.json does not exist"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--response-store-max-entries", "0"], "--response-store-max-entries must be at least 1"),
    (["--response-store-ttl", "-1"], "--response-store-ttl must be positive"),
    (["--max_model_len", "99999"], "max_model_len must be in [1,"),  # vLLM's underscore spelling
    (["--max_model_len=0"], "max_model_len must be in [1,"),
    (["--data-parallel-size", "0"], "--data-parallel-size must be at least 1"),
])
def test_bad_values_name_the_flag(flags, message, model_dirs):
    out = serve(str(model_dirs("llama")), *flags, *_FAST)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]


def test_data_parallel_replicas_need_a_gpu_each_where_there_are_gpus(model_dirs):
    out = serve(str(model_dirs("llama")), "-dp", "2", "-tp", "2", *_FAST, CUDA_VISIBLE_DEVICES="0,1,2")
    assert out.returncode != 0
    assert "--data-parallel-size 2 x --tensor-parallel-size 2 x --pipeline-parallel-size 1 needs 4 GPUs; 3 visible" in out.stderr


def test_model_given_bare_wins_over_the_config_files(tmp_path, model_dirs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: /no/such/model\nmax-model-len: 99999\n")
    out = serve(str(model_dirs("llama")), "--config", str(cfg), *_FAST)
    assert out.returncode == 2
    assert "max_model_len must be in [1," in out.stderr and "/no/such/model" not in out.stderr


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    out = serve("--config", str(bad))
    assert out.returncode == 2 and "expected a mapping of flag names to values" in out.stderr
    out = serve("--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml" in out.stderr


def test_noop_values_of_unsupported_flags_are_accepted(model_dirs):
    """`--kv-cache-dtype auto` and `--load-format safetensors` ask for what pagedserve does: the stack
    starts (and, with --ready-timeout 0, stops at once with the timeout's message)."""
    out = serve("--enable-chunked-prefill", str(model_dirs("llama")), "--pipeline-parallel-size", "1",
                "--kv-cache-dtype", "auto", "--load-format", "safetensors", "--disable-uvicorn-access-log",
                "--logprobs-mode", "raw_logprobs", "--disable-cascade-attn", "--max-num-partial-prefills", "1", *_FAST,
                module="pagedserve.entrypoints.openai.api_server")
    assert "does not support" not in out.stderr
    assert "did not become healthy within 0s" in out.stderr, out.stderr[-2000:]
