"""vLLM flags that pagedserve does not implement. Each is known to the parser so that a launch
script using one fails with a message saying so, never silently; a value that asks for what
pagedserve does anyway (``--load-format safetensors``) is accepted.
A flag neither vLLM's nor ours gets argparse's own error."""

from __future__ import annotations

import argparse

# flag (and its short spellings) -> values that ask for what pagedserve does anyway
UNSUPPORTED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("--lora-dtype",): (),
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
    ("--distributed-executor-backend",): ("mp",),
    ("--chat-template-content-format",): ("auto", "string"),
    ("--middleware",): (),
    ("--otlp-traces-endpoint",): (),
    ("--task",): ("generate",),
    ("--ssl-cert-reqs",): ("0",),
    ("--convert",): ("auto", "none"),
    ("--model-impl",): ("auto", "vllm"),  # pagedserve's own model code
    ("--worker-cls",): ("auto",),
    ("--long-prefill-token-threshold",): ("0",),
    ("--max-num-partial-prefills",): ("1",),
    ("--logprobs-mode",): ("raw_logprobs",),  # logprobs of the model's logits, before any processing
    ("--structured-outputs-config",): (),
    ("--max-parallel-loading-workers",): (),
    ("--data-parallel-address",): (),
    ("--data-parallel-size-local",): (),
    ("--data-parallel-start-rank",): (),
    ("--data-parallel-rpc-port",): (),
    ("--data-parallel-backend",): ("mp",),
    ("--prefix-caching-hash-algo",): (),
    ("--tool-parser-plugin",): (),
    ("--reasoning-parser-plugin",): (),
    ("--log-config-file",): (),
    ("--h11-max-incomplete-event-size",): (),
    ("--allowed-local-media-path",): (),
    ("--mm-processor-cache-gb",): (),
    ("--default-mm-loras",): (),
    ("--show-hidden-metrics-for-version",): (),
    ("--collect-detailed-traces",): (),
    ("--disable-access-log-for-endpoints",): (),
}

# on/off switches -> whether giving it asks for what pagedserve does anyway
UNSUPPORTED_SWITCHES: dict[str, bool] = {
    "--enable-expert-parallel": False,
    "--enable-sleep-mode": False,
    "--headless": False,
    "--disable-fastapi-docs": False,
    "--enable-log-outputs": False,
    "--enable-prompt-tokens-details": False,
    "--disable-sliding-window": False,
    "--no-enable-chunked-prefill": False,
    "--enable-chunked-prefill": True,  # pagedserve always chunks long prompts
    "--disable-custom-all-reduce": True,  # pagedserve has no custom all-reduce
    "--disable-cascade-attn": True,  # pagedserve has no cascade attention
    "--skip-tokenizer-init": False,
    "--enable-tokenizer-info-endpoint": False,
    "--enable-server-load-tracking": True,  # GET /load always counts
    "--disable-frontend-multiprocessing": False,
    "--enable-eplb": False,
    "--fully-sharded-loras": False,
    "--enable-lora-bias": False,
    "--calculate-kv-scales": False,
    "--log-error-stack": False,
    "--enable-log-deltas": False,
    "--tokens-only": False,
}


class _Unsupported(argparse.Action):
    """A flag that fails with a message unless given a value (or, for a switch, given at all)
    that asks for what pagedserve does anyway. A switch takes no value, so it never swallows
    the model that follows it."""

    def __init__(self, option_strings, dest, accepted: tuple[str, ...] = (), switch: bool = False, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if switch else None, default=argparse.SUPPRESS, **kwargs)
        self.accepted = accepted

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if (values if values != [] else "") in self.accepted:
            return  # asks for what pagedserve does anyway
        shown = [v for v in self.accepted if v]
        extra = f" (accepted value: {', '.join(shown)})" if shown else ""
        parser.error(f"{option_string} is a vLLM flag that pagedserve does not support yet{extra}; "
                     "see the README's 'Migrating from vLLM'")


def add_unsupported_flags(parser: argparse.ArgumentParser) -> None:
    names = [flags[0] for flags in UNSUPPORTED] + [f for f, ok in UNSUPPORTED_SWITCHES.items() if not ok]
    for flags, accepted in UNSUPPORTED.items():
        parser.add_argument(*flags, action=_Unsupported, accepted=accepted, help=argparse.SUPPRESS)
    for flag, accepted_bare in UNSUPPORTED_SWITCHES.items():
        parser.add_argument(flag, action=_Unsupported, accepted=("",) if accepted_bare else (), switch=True,
                            help=argparse.SUPPRESS)
    parser.epilog = ("vLLM flags not supported yet (each fails with a message saying so): " + ", ".join(names)
                     + ".")
