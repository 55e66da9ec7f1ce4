"""vLLM flags that pagedserve does not implement. Each is known to the parser so that a launch
script using one fails with a message saying so, never silently; a value that asks for what
pagedserve does anyway (``--pipeline-parallel-size 1``, ``--kv-cache-dtype auto``) is accepted.
A flag neither vLLM's nor ours gets argparse's own error."""

from __future__ import annotations

import argparse

# flag (and its short spellings) -> values that ask for what pagedserve does anyway
UNSUPPORTED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("--kv-cache-dtype",): ("auto",),
    ("--quantization", "-q"): (),
    ("--speculative-config",): (),
    ("--pipeline-parallel-size", "-pp"): ("1",),
    ("--data-parallel-size", "-dp"): ("1",),
    ("--enable-expert-parallel",): (),
    ("--enable-lora",): (),
    ("--lora-modules",): (),
    ("--max-loras",): (),
    ("--max-lora-rank",): (),
    ("--cpu-offload-gb",): ("0",),
    ("--swap-space",): (),
    ("--load-format",): ("auto", "safetensors"),
    ("--download-dir",): (),
    ("--tokenizer-mode",): ("auto",),
    ("--tokenizer-revision",): (),
    ("--code-revision",): (),
    ("--hf-overrides",): (),
    ("--rope-scaling",): (),
    ("--limit-mm-per-prompt",): (),
    ("--mm-processor-kwargs",): (),
    ("--compilation-config", "-O"): (),
    ("--kv-transfer-config",): (),
    ("--enable-sleep-mode",): (),
    ("--distributed-executor-backend",): ("mp",),
    ("--disable-custom-all-reduce",): (),
    ("--chat-template-content-format",): ("auto", "string"),
    ("--lora-dtype",): (),
    ("--max-cpu-loras",): (),
    ("--headless",): (),
    ("--disable-fastapi-docs",): (),
    ("--middleware",): (),
    ("--otlp-traces-endpoint",): (),
    ("--task",): ("generate",),
    ("--runner",): ("generate", "auto"),
    ("--enable-log-outputs",): (),
    ("--ssl-cert-reqs",): ("0",),
}


class _Unsupported(argparse.Action):
    def __init__(self, option_strings, dest, accepted: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self.accepted = accepted

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is not None and str(values) in self.accepted:
            return  # asks for what pagedserve does anyway
        extra = f" (accepted value: {', '.join(self.accepted)})" if self.accepted else ""
        parser.error(f"{option_string} is a vLLM flag that pagedserve does not support yet{extra}; "
                     "see the README's 'Migrating from vLLM'")


def add_unsupported_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM flags not supported yet (each fails with a message)")
    for flags, accepted in UNSUPPORTED.items():
        group.add_argument(*flags, action=_Unsupported, accepted=accepted, help=argparse.SUPPRESS)
