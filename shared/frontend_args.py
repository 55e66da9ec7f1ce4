"""The frontend's flags (every one through shared.engine_args.add_flag, so each reads its
PAGEDSERVE_* variable) and the configuration built from them. Here in shared/ beside the engine's
flags, since `pagedserve serve` forwards them and imports nothing of the frontend.

``add_http_arguments`` holds the flags a user sets on `pagedserve serve` too, with vLLM's names and
meanings; `serve` forwards each of them (HTTP_FLAG_NAMES) to every frontend it starts.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
from pathlib import Path

from shared.auth import add_auth_args
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT, add_flag, flag_names
from shared.lora import parse_lora_modules
from shared.sampling_params import MAX_LOGPROBS

LOG_LEVELS = ("debug", "info", "warning", "error")
ROUTING_CHOICES = ("affinity", "round_robin")  # --data-parallel-routing (services/frontend/routing.py)
DEFAULT_MAX_BODY_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a frontend (enforced in services/frontend/limits.py)."""

    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_n: int = 128
    max_logprobs: int = MAX_LOGPROBS  # vLLM's default, 20
    max_prompts_per_request: int = 64
    trust_request_chat_template: bool = False  # vLLM's --trust-request-chat-template
    chat_template_timeout: float = 2.0  # a trusted client template is killed after this long

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_n", "max_prompts_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}] (the engine's limit), got {self.max_logprobs}")
        if not self.chat_template_timeout > 0:
            raise ValueError(f"chat_template_timeout must be positive, got {self.chat_template_timeout}")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag of `pagedserve frontend`."""
    add_flag(p, "--host", "127.0.0.1", "address to listen on")
    add_flag(p, "--port", 8000, "HTTP port, shareable between frontends (SO_REUSEPORT)")
    add_flag(p, "--engine-input", [DEFAULT_ENGINE_INPUT], "engine input ROUTER address; data-parallel replicas: "
             "one per engine (PAGEDSERVE_ENGINE_INPUT comma-separated)", nargs="+")
    add_flag(p, "--engine-output", [DEFAULT_ENGINE_OUTPUT], "engine output ROUTER address, one per engine in "
             "--engine-input's order", nargs="+")
    add_routing_arguments(p)
    add_flag(p, "--api-key", None, "require 'Authorization: Bearer KEY' on /v1/*", kind=str)
    add_flag(p, "--served-model-name", None, "model name(s) clients use (default: the engine's); "
             "PAGEDSERVE_SERVED_MODEL_NAME comma-separated", nargs="+")
    add_flag(p, "--frontend-id", None, "this frontend's engine identity, unique per process (default: a random "
             "uuid4; no environment variable, since replicas share their environment)", kind=str, env=False)
    add_flag(p, "--metrics-port", None, "also serve this process's /metrics on its own port", kind=int)
    add_flag(p, "--health-timeout", 5.0, "seconds /health waits for the engine's Pong before answering 503")
    add_flag(p, "--stall-timeout", 10.0, "seconds a request waits for output before pinging the engine")
    add_flag(p, "--shutdown-timeout", 10.0, "seconds open requests may take to finish after SIGTERM")
    add_flag(p, "--resume-timeout", 30.0, "seconds a request waits for a silent engine to come back")
    add_flag(p, "--ready-file", None, "create this file once the frontend can serve", kind=str, env=False)
    add_flag(p, "--log-level", "info", "this process's log level", choices=LOG_LEVELS)
    add_auth_args(p)
    add_http_arguments(p)
    # the frontend's older spelling of --tokenizer (its PAGEDSERVE_TOKENIZER default comes first)
    add_flag(p, "--model", None, "the same as --tokenizer", dest="tokenizer", env=False)
    return p


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """Flags `serve` takes as well and forwards to its frontends (vLLM's names and meanings)."""
    add_limit_arguments(p)
    add_flag(p, "--disable-ui", False, "do not serve the chat page at /")
    add_flag(p, "--tokenizer", None, "tokenizer directory or hub id (default: the model's)", kind=str)
    add_flag(p, "--trust-remote-code", False, "let a hub tokenizer run its own code (pagedserve never runs "
             "model code from the hub: its architectures are its own)")
    add_flag(p, "--chat-template", None, "the server's chat template: a file, or the template inline", kind=str)
    add_flag(p, "--response-role", "assistant", "the role of chat answers (when add_generation_prompt is true)")
    add_flag(p, "--return-tokens-as-token-ids", False, "logprob tokens as 'token_id:N' strings")
    add_flag(p, "--enable-force-include-usage", False, "every stream ends with a usage chunk, as if "
             "stream_options.include_usage were set")
    add_flag(p, "--exclude-tools-when-tool-choice-none", False, "with tool_choice none, the chat template is "
             "not shown the request's tools")
    add_flag(p, "--enable-request-id-headers", False, "answer with an X-Request-Id header: the request's own, or a "
             "fresh id")
    add_flag(p, "--enable-log-requests", False, "log each request as it arrives (prompt ids and parameters)")
    p.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_false",
                   help="do not log requests (the default)")
    add_flag(p, "--max-log-len", None, "most prompt ids printed per logged request (default: all)", kind=int)
    add_flag(p, "--uvicorn-log-level", "info", "uvicorn's log level", choices=UVICORN_LOG_LEVELS)
    add_flag(p, "--disable-uvicorn-access-log", False, "no access log lines (there are none unless uvicorn's level "
             "is debug or trace)")
    add_flag(p, "--allowed-origins", None, "CORS: origins allowed to call the API from a browser, as words or a "
             "JSON list (default: none; vLLM's default is *)", nargs="+")
    add_flag(p, "--allowed-methods", ["*"], "CORS: allowed methods (words or a JSON list)", nargs="+")
    add_flag(p, "--allowed-headers", ["*"], "CORS: allowed headers (words or a JSON list)", nargs="+")
    add_flag(p, "--allow-credentials", False, "CORS: allow credentials")
    add_flag(p, "--root-path", None, "the path prefix of a path-based routing proxy in front of the server", kind=str)
    add_flag(p, "--ssl-keyfile", None, "serve HTTPS with this private key file", kind=str)
    add_flag(p, "--ssl-certfile", None, "serve HTTPS with this certificate file", kind=str)
    add_flag(p, "--ssl-ca-certs", None, "CA certificates file (to verify client certificates)", kind=str)
    add_flag(p, "--vllm-metric-names", False, "also export the engine's load on /metrics under vLLM's names "
             "(vllm:num_requests_waiting, ...), for routers and dashboards built for vLLM")
    add_flag(p, "--lora-modules", None, "LoRA adapters served by name: name=path words or JSON objects "
             '{"name": ..., "path": ...} (needs --enable-lora); a request picks one by its model', nargs="+")
    add_chat_parser_arguments(p)


def add_routing_arguments(p: argparse.ArgumentParser) -> None:
    """How a frontend spreads requests over data-parallel replicas (`serve` forwards it)."""
    add_flag(p, "--data-parallel-routing", "affinity", "with several engines: affinity (the replica holding the "
             "prompt's first blocks in its prefix cache, unless much more loaded; else the least loaded) or "
             "round_robin", choices=ROUTING_CHOICES)


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one request may ask (services.frontend.limits); past a limit, a clear 4xx."""
    d = RequestLimits()
    add_flag(p, "--max-request-body-bytes", d.max_request_body_bytes, "larger request bodies get 413")
    add_flag(p, "--max-n", d.max_n, "most samples (n) per prompt")
    add_flag(p, "--max-logprobs", d.max_logprobs,
             "most logprobs / top_logprobs / prompt_logprobs a request may ask (at most 20, the engine's)")
    add_flag(p, "--max-prompts-per-request", d.max_prompts_per_request, "most prompts in one completions request")
    add_flag(p, "--trust-request-chat-template", False, "render chat templates sent by clients (sandboxed, in a "
             "child process killed after --chat-template-timeout); without it such requests get 400")
    add_flag(p, "--chat-template-timeout", d.chat_template_timeout, "seconds a client's chat template may take")


def add_chat_parser_arguments(p: argparse.ArgumentParser) -> None:
    """Tool-call and reasoning parsers of chat outputs (shared.processor.chat); an unknown name
    fails at startup with the list of names."""
    from shared.processor.parsers import REASONING_PARSERS, TOOL_PARSERS

    add_flag(p, "--enable-auto-tool-choice", False,
             "parse tool calls from the model's text when tool_choice is auto (needs --tool-call-parser)")
    add_flag(p, "--tool-call-parser", None, "the model family's tool call format", choices=tuple(TOOL_PARSERS))
    add_flag(p, "--reasoning-parser", None, "split <think> reasoning into reasoning_content",
             choices=tuple(REASONING_PARSERS))
    add_flag(p, "--response-store-max-entries", 1000, "most responses the Responses API keeps (least recently "
             "used go first)")
    add_flag(p, "--response-store-ttl", 3600.0, "seconds the Responses API keeps a response")


def check_frontend_args(args: argparse.Namespace) -> str | None:
    """What a frontend would refuse, found before anything starts (ValueError naming the flag);
    returns the chat template (--chat-template, a file or inline)."""
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if args.response_store_max_entries < 1:
        raise ValueError(f"--response-store-max-entries must be at least 1, got {args.response_store_max_entries}")
    if not args.response_store_ttl > 0:
        raise ValueError(f"--response-store-ttl must be positive, got {args.response_store_ttl}")
    parse_lora_modules(args.lora_modules)
    return load_chat_template(args.chat_template)


HTTP_FLAG_NAMES = flag_names(add_http_arguments)  # what `serve` forwards to each frontend


def load_chat_template(value: str | None) -> str | None:
    """vLLM's rule: a readable file gives its text; a value with no Jinja character ({, } or a
    newline) is taken for a path that could not be opened (an error); anything else is the
    template itself, with backslash escapes (\\n) interpreted. The template must compile."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        template = path.read_text()
    except (OSError, ValueError) as exc:
        if not any(ch in value for ch in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but it could not be read: {exc}") from None
        template = codecs.decode(value, "unicode_escape")
    from jinja2 import Environment, TemplateSyntaxError

    try:
        Environment().parse(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template does not compile: {exc}") from None
    return template


def word_list(values: list[str] | None) -> list[str] | None:
    """A CORS list given as words (--allowed-origins a b) or as vLLM's JSON list ('["a", "b"]')."""
    if values is None:
        return None
    out: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                items = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON list: {value!r} ({exc})") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"not a JSON list of strings: {value!r}")
            out += items
        else:
            out.append(value)
    return out


def limits(args: argparse.Namespace) -> RequestLimits:
    """Each field has the flag of the same name."""
    return RequestLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RequestLimits)})
