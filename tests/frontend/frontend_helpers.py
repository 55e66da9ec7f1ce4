"""Helpers for frontend tests: free ports, a tiny byte-level BPE tokenizer with a chat template
(no torch, no network), and service processes that die with the test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "PagedAttention keeps the KV cache in fixed-size blocks, like pages of virtual memory.",
    "Once upon a time there was a small model that liked to count: one two three four five.",
    "Café, naïve, 日本語, emoji 🙂 and other UTF-8 text split across byte-level tokens.",
    "def add(a, b):\n    return a + b\n",
]

# greedy and length-bound: the model's deterministic answer, whatever EOS it would sample
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}




def make_tokenizer_dir(out: Path) -> Path:
    """A saved PreTrainedTokenizerFast (byte-level BPE, BOS/EOS, a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


# Runs `python -m MODULE ARGS` after asking Linux to SIGTERM the child when the test process dies,
# however it dies, so no service outlives a killed test run.
_LAUNCHER = (
    "import ctypes, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'): ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


class Proc:
    """A service process (its own process group), stopped and reaped on close."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, *self._launch(args)], cwd=REPO, env=full_env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    @staticmethod
    def _launch(args: list[str]) -> list[str]:
        assert args[0] == "-m", "services are started as modules"
        return ["-c", _LAUNCHER, *args]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def close(self) -> None:
        self.terminate()
        self._log.close()


def frontend_args(port: int, engine_input: str, engine_output: str, *extra: str) -> list[str]:
    return ["-m", "services.frontend.server", "--port", str(port), "--engine-input", engine_input,
            "--engine-output", engine_output, "--log-level", "warning", *extra]


def wait_until(url: str, proc: Proc | None = None, timeout: float = 60.0, status: int = 200) -> httpx.Response:
    """Poll ``url`` until it answers ``status`` (fails fast if ``proc`` dies)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
        try:
            resp = httpx.get(url, timeout=5)
            if resp.status_code == status:
                return resp
            last = resp.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    tail = proc.log()[-4000:] if proc is not None else ""
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last!r})\n{tail}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def metric_labels(page: str, name: str) -> dict[str, str]:
    """The labels of the one sample of ``name`` on a metrics page."""
    lines = [ln for ln in page.splitlines() if ln.startswith(name + "{")]
    assert len(lines) == 1, (name, lines)
    return dict(re.findall(r'(\w+)="([^"]*)"', lines[0].split("}")[0]))
