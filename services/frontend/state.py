"""What one frontend process holds: its configuration, engine client, tokenizer and metrics,
and the request checks every endpoint shares (model name, readiness, prompt limits)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from jinja2 import TemplateError

from services.frontend.engine_client import EngineClient
from services.frontend.errors import bad_request, engine_unavailable, from_value_error, model_not_found
from services.frontend.generation import Generation
from services.frontend.logprobs import TokenText
from services.frontend.metrics import FrontendMetrics
from services.frontend.request_metrics import RequestMetrics
from services.frontend.tokenizer import apply_chat_template, load_tokenizer
from shared.auth import CurveClient
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT
from shared.protocol import ModelInfo
from shared.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_SAMPLING_FIELDS = frozenset(SamplingParams.__struct_fields__)
_PARAM_NAMES = set(_SAMPLING_FIELDS) | {"max_completion_tokens", "top_logprobs", "prompt"}


@dataclass(frozen=True)
class FrontendConfig:
    engine_input: str = DEFAULT_ENGINE_INPUT
    engine_output: str = DEFAULT_ENGINE_OUTPUT
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # empty: the engine's model name
    tokenizer: str | None = None  # None: the model path the engine reports
    frontend_id: str | None = None  # None: a random uuid4 hex
    health_timeout: float = 5.0  # seconds /health waits for the engine's Pong
    stall_timeout: float = 10.0  # seconds without output before a request pings the engine
    curve: CurveClient | None = None  # CURVE keys for the engine link (shared.auth); None: plain


class FrontendState:
    """Created with the app; ``startup``/``shutdown`` run in the app's lifespan."""

    def __init__(self, config: FrontendConfig):
        self.config = config
        self.frontend_id = config.frontend_id or uuid.uuid4().hex
        names = config.served_model_names
        self.metrics = FrontendMetrics(self.frontend_id, names[0] if names else None)
        self.client = EngineClient(config.engine_input, config.engine_output, self.frontend_id, config.curve)
        self.tokenizer: Any = None
        self.token_text: TokenText | None = None
        self.setup_error: str | None = None
        # One thread: tokenization leaves the event loop, and the tokenizer is never used by two
        # of our threads at once.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._setup: asyncio.Task | None = None

    # ----- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.client.start()
        self._setup = asyncio.create_task(self._prepare(), name="frontend-setup")

    async def _prepare(self) -> None:
        """Wait for the engine's ModelInfo, then load the tokenizer it names (or ours)."""
        info = await self.client.wait_ready()
        self.metrics.set_model(self.served_names()[0])
        path = self.config.tokenizer or info.model_path
        try:
            tokenizer = await self.run(load_tokenizer, path)
        except Exception as exc:  # a bad path must not kill the process: report it on every request
            self.setup_error = f"could not load the tokenizer from {path!r}: {exc}"
            log.exception("%s", self.setup_error)
            return
        self.token_text = TokenText(tokenizer)
        self.tokenizer = tokenizer
        self.metrics.set_ready()
        log.info("frontend %s ready: serving %s", self.frontend_id, ", ".join(self.served_names()))

    async def shutdown(self) -> None:
        if self._setup is not None:
            self._setup.cancel()
        await self.client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- checks shared by the endpoints -------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.client.model_info is not None and self.tokenizer is not None

    def require_ready(self) -> ModelInfo:
        info = self.client.model_info
        if info is None:
            raise engine_unavailable("The engine has not connected yet; try again shortly.")
        if self.tokenizer is None:
            raise engine_unavailable(self.setup_error or "The frontend is still loading the tokenizer.")
        return info

    def served_names(self) -> list[str]:
        if self.config.served_model_names:
            return list(self.config.served_model_names)
        info = self.client.model_info
        if info is None:
            raise engine_unavailable("The engine has not connected yet; try again shortly.")
        return [info.model_name]

    def check_model(self, requested: str | None) -> str:
        """The model name to answer with; 404 for a model we do not serve."""
        names = self.served_names()
        if requested is None:
            return names[0]
        if requested not in names:
            raise model_not_found(requested)
        return requested

    def check_prompt(self, ids: list[int], param: str) -> None:
        info = self.require_ready()
        if not ids:
            raise bad_request(f"The {param} must contain at least one token.", param=param)
        bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is out of range for a vocabulary of {info.vocab_size}.", param=param)
        if len(ids) + 1 > info.max_model_len:
            msg = (
                f"This model's maximum context length is {info.max_model_len} tokens. However, your {param} is "
                f"{len(ids)} tokens long, which leaves no room for a completion. Please shorten your {param}."
            )
            raise bad_request(msg, param=param, code="context_length_exceeded")

    def sampling_params(self, request: Any, default_max_tokens: int | None) -> SamplingParams:
        info = self.require_ready()
        try:
            defaults = {k: v for k, v in info.generation_defaults.items() if k in _SAMPLING_FIELDS}
            params = request.to_sampling_params(defaults, default_max_tokens)
        except ValueError as exc:
            raise from_value_error(exc, _PARAM_NAMES) from None
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {}))):
            bad = next((t for t in ids if t >= info.vocab_size), None)
            if bad is not None:
                raise bad_request(f"{name}: token id {bad} is out of range for a vocabulary of {info.vocab_size}.", name)
        return params

    # ----- tokenizer work, off the event loop ---------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, template_kwargs: dict[str, Any] | None = None
    ) -> list[int]:
        try:
            return await self.run(
                apply_chat_template,
                self.tokenizer,
                messages,
                add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )
        except (ValueError, TypeError, KeyError, TemplateError) as exc:  # e.g. raise_exception in the template
            raise bad_request(f"The chat template could not render these messages: {exc}", param="messages") from None

    async def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self.run(self.tokenizer.decode, ids, skip_special_tokens=skip_special_tokens)

    def generation(self, prompts: list[list[int]], params: SamplingParams, endpoint: str, arrival: float) -> Generation:
        return Generation(
            self.client,
            self.tokenizer,
            prompts,
            params,
            stall_timeout=self.config.stall_timeout,
            ping_timeout=self.config.health_timeout,
            metrics=RequestMetrics(self.metrics, endpoint, arrival),
        )
