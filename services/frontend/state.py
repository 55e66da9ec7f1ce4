"""What one frontend process holds: its configuration, engine client, tokenizer and metrics,
and the request checks every endpoint shares (model name, readiness, prompt limits)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.frontend.engine_client import EngineClient
from services.frontend.errors import bad_request, engine_unavailable, from_value_error, model_not_found
from services.frontend.generation import Generation
from services.frontend.limits import check_caps
from services.frontend.lora_adapters import LoRAAdapters
from services.frontend.metrics import FrontendMetrics
from services.frontend.pooling_requests import check_task
from services.frontend.replicas import EngineReplicas
from services.frontend.request_log import log_request
from services.frontend.request_metrics import RequestMetrics
from services.frontend.routing import make_router
from services.frontend.tokenization import Tokenization
from shared.auth import CurveClient
from shared.engine_args import DEFAULT_ENGINE_INPUT, DEFAULT_ENGINE_OUTPUT
from shared.frontend_args import RequestLimits
from shared.pooling import PoolingParams
from shared.processor.chat import ChatParsers, ChatPlan
from shared.processor.processor import ModelFacts, RequestProcessor
from shared.processor.token_text import TokenIdText, TokenText
from shared.processor.tokenizer import load_tokenizer
from shared.protocol import ModelInfo
from shared.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_SAMPLING_FIELDS = frozenset(SamplingParams.__struct_fields__)
_PARAM_NAMES = set(_SAMPLING_FIELDS) | {"max_completion_tokens", "top_logprobs", "prompt"}


@dataclass(frozen=True)
class FrontendConfig:
    # one engine, or data-parallel replicas: the i-th input and output addresses are replica i's
    engine_inputs: tuple[str, ...] = (DEFAULT_ENGINE_INPUT,)
    engine_outputs: tuple[str, ...] = (DEFAULT_ENGINE_OUTPUT,)
    data_parallel_routing: str = "affinity"  # how requests are spread over replicas (routing.py)
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # empty: the engine's model name
    tokenizer: str | None = None  # None: the model path the engine reports
    frontend_id: str | None = None  # None: a random uuid4 hex
    health_timeout: float = 5.0  # seconds /health waits for the engine's Pong
    stall_timeout: float = 10.0  # seconds without output before a request pings the engine
    limits: RequestLimits = field(default_factory=RequestLimits)  # what one request may ask (limits.py)
    curve: CurveClient | None = None  # CURVE keys for the engine link (shared.auth); None: plain
    resume_timeout: float = 30.0  # seconds a request waits for a silent engine to come back
    ready_file: str | None = None  # created once this frontend can serve (`serve` waits for each)
    enable_ui: bool = True  # the chat page at / (ui_routes.py)
    # chat outputs' parsers (shared.processor.chat.ChatParsers; names checked there)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False
    # the Responses API's store (response_store.py): most responses kept, and for how long
    response_store_max_entries: int = 1000
    response_store_ttl: float = 3600.0
    # vLLM's server flags (shared/frontend_args.py)
    trust_remote_code: bool = False  # a hub tokenizer may run its own code
    chat_template: str | None = None  # the server's template, over the model's (trusted: the operator's)
    response_role: str = "assistant"  # the role of chat answers
    return_tokens_as_token_ids: bool = False  # logprob tokens as 'token_id:N'
    force_include_usage: bool = False  # every stream ends with its usage chunk
    exclude_tools_when_tool_choice_none: bool = False  # tool_choice none: the template sees no tools
    request_id_headers: bool = False  # X-Request-Id on every answer (middleware.py)
    log_requests: bool = False  # log each request as it arrives
    max_log_len: int | None = None  # most prompt ids in a logged request
    vllm_metric_names: bool = False  # also export the engine's load under vLLM's names (engine_gauges.py)
    lora_modules: tuple[tuple[str, str], ...] = ()  # --lora-modules: (name, adapter folder)

    def __post_init__(self) -> None:
        if not self.engine_inputs or len(self.engine_inputs) != len(self.engine_outputs):
            raise ValueError(f"--engine-input gives {len(self.engine_inputs)} address(es) and --engine-output "
                             f"{len(self.engine_outputs)}: one of each per engine")
        for flag, addrs in (("--engine-input", self.engine_inputs), ("--engine-output", self.engine_outputs)):
            if len(set(addrs)) != len(addrs):  # one engine counted twice would double its load and blocks
                raise ValueError(f"{flag} names an engine twice: {' '.join(addrs)}")


class FrontendState:
    """Created with the app; ``startup``/``shutdown`` run in the app's lifespan."""

    def __init__(self, config: FrontendConfig):
        self.config = config
        self.frontend_id = config.frontend_id or uuid.uuid4().hex
        names = config.served_model_names
        self.metrics = FrontendMetrics(self.frontend_id, names[0] if names else None)
        # each client has its own identity (and request ids): a replica knows nothing of the others
        clients = [EngineClient(inp, out, self.frontend_id, config.curve)
                   for inp, out in zip(config.engine_inputs, config.engine_outputs)]
        self.engines = EngineReplicas(clients, make_router(config.data_parallel_routing))
        self.metrics.watch_engine(self.engines.summed, config.vllm_metric_names)
        self.metrics.watch_replicas(self.engines)
        self.tokenizer: Any = None
        self.tokens: Tokenization | None = None  # the tokenizer's work, once it is loaded
        self.processor: RequestProcessor | None = None  # shared with the offline LLM (shared.processor)
        self.setup_error: str | None = None
        self.loras = LoRAAdapters(config.lora_modules)
        self.chat_parsers = ChatParsers(config.tool_call_parser, config.reasoning_parser,
                                        config.enable_auto_tool_choice)
        self._setup: asyncio.Task | None = None

    # ----- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.engines.start()
        self._setup = asyncio.create_task(self._prepare(), name="frontend-setup")

    async def _prepare(self) -> None:
        """Wait for the engine's ModelInfo, then load the tokenizer it names (or ours)."""
        info = await self.engines.wait_ready()
        self.metrics.set_model(self.served_names()[0])
        path = self.config.tokenizer or info.model_path
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, path, self.config.trust_remote_code)
            if self.config.chat_template is not None:
                tokenizer.chat_template = self.config.chat_template
            self.tokens = Tokenization(tokenizer, self.config.limits)
        except Exception as exc:  # a bad path must not kill the process: report it on every request
            self.setup_error = f"could not load the tokenizer from {path!r}: {exc}"
            log.exception("%s", self.setup_error)
            return
        try:
            self.loras.setup(info, self.served_names())
        except ValueError as exc:  # a bad --lora-modules: reported on every request, as a bad tokenizer
            self.setup_error = f"--lora-modules: {exc}"
            log.error("%s", self.setup_error)
            return
        defaults = {k: v for k, v in info.generation_defaults.items() if k in _SAMPLING_FIELDS}
        facts = ModelFacts(info.vocab_size, info.max_model_len, defaults, tuple(info.eos_token_ids))
        self.processor = RequestProcessor(tokenizer, facts)
        self.tokenizer = tokenizer
        self.metrics.set_ready()
        if self.config.ready_file:
            await self.engines.wait_all_ready()  # `serve` reports the stack ready once every replica is
            Path(self.config.ready_file).touch()
        log.info("frontend %s ready: serving %s", self.frontend_id, ", ".join(self.served_names()))

    async def shutdown(self) -> None:
        if self._setup is not None:
            self._setup.cancel()
        await self.engines.close()
        if self.tokens is not None:
            await self.tokens.close()

    # ----- checks shared by the endpoints -------------------------------------------------------

    @property
    def token_text(self) -> TokenText | None:
        if self.processor is None:
            return None
        return TokenIdText() if self.config.return_tokens_as_token_ids else self.processor.token_text

    def require_ready(self) -> ModelInfo:
        info = self.engines.model_info
        if info is None:
            raise engine_unavailable("The engine has not connected yet; try again shortly.")
        if self.tokenizer is None:
            raise engine_unavailable(self.setup_error or "The frontend is still loading the tokenizer.")
        return info

    def served_names(self) -> list[str]:
        if self.config.served_model_names:
            return list(self.config.served_model_names)
        info = self.engines.model_info
        if info is None:
            raise engine_unavailable("The engine has not connected yet; try again shortly.")
        return [info.model_name]

    def check_model(self, requested: str | None) -> str:
        """The model name to answer with; 404 for a model we do not serve."""
        names = self.served_names()
        if requested is None:
            return names[0]
        if requested not in names and self.loras.get(requested) is None:
            raise model_not_found(requested)
        return requested

    def check_endpoint(self, endpoint: str, pooling: bool = False) -> None:
        """400 when the model does not serve this endpoint (a generation endpoint of a pooling
        model, or the reverse), naming the endpoints it serves."""
        info = self.require_ready()
        check_task(info.task, endpoint, pooling, len(info.labels))

    def check_prompt(self, ids: list[int], param: str, truncate_prompt_tokens: int | None = None) -> list[int]:
        """The prompt, truncated when asked, checked against the vocabulary and context (400 naming
        the field)."""
        try:
            return self._processor().check_prompt(ids, param, truncate_prompt_tokens)
        except ValueError as exc:
            raise from_value_error(exc, _PARAM_NAMES) from None

    def check_limits(self, request: Any) -> None:
        """400 for a request past this server's caps (n, logprobs, prompts), or with more
        sequences (n x prompts) than the engine ever queues."""
        check_caps(request, self.config.limits)
        info = self.engines.model_info
        queued = info.max_num_queued_requests if info is not None else 0
        sequences = (request.n or 1) * getattr(request, "num_prompts", 1)
        if queued and sequences > queued:
            msg = f"This request asks for {sequences} sequences (n x prompts); this server queues at most {queued}."
            raise bad_request(msg, "n")

    def sampling_params(self, request: Any, default_max_tokens: int | None, prompts: list[list[int]],
                        prompt_param: str, plan: ChatPlan | None = None) -> SamplingParams:
        """The engine parameters of ``request`` for these (checked) prompts: the processor's
        checks and the model's defaults, as offline (and a chat request's tool constraint)."""
        try:
            params = self._processor().sampling_params(request.to_sampling_params(), prompts, default_max_tokens,
                                                       prompt_param, request.max_tokens_param)
            return params if plan is None else plan.sampling_params(params)
        except ValueError as exc:
            raise from_value_error(exc, _PARAM_NAMES) from None

    def chat_plan(self, messages: list[dict[str, Any]], tools: Any, tool_choice: Any,
                  parallel_tool_calls: Any) -> ChatPlan:
        """A chat request's tool fields checked with this server's parsers (400 naming the field)."""
        try:
            plan = ChatPlan(self.chat_parsers, messages, tools, tool_choice, parallel_tool_calls)
        except ValueError as exc:
            raise from_value_error(exc, _PARAM_NAMES) from None
        if self.config.exclude_tools_when_tool_choice_none and plan.tool_choice == "none":
            plan.tools = []  # checked, but not shown to the template
        return plan

    def include_usage(self, request: Any) -> bool:
        """A stream ends with a usage chunk: asked by stream_options, or forced by the server."""
        return request.include_usage or self.config.force_include_usage

    def _processor(self) -> RequestProcessor:
        self.require_ready()
        assert self.processor is not None
        return self.processor

    # ----- tokenizer work, off the event loop (services.frontend.tokenization) ----------------

    async def encode(self, texts: list[str], add_special_tokens: bool = True, *,
                     fit_param: str | None = None) -> list[list[int]]:
        """Token ids of each text; with ``fit_param``, a text too long for the context is refused first."""
        max_len = self.require_ready().max_model_len if fit_param else None
        return await self._tokens().encode(texts, add_special_tokens=add_special_tokens, max_model_len=max_len,
                                           param=fit_param or "prompt")

    async def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool, *,
                          chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None,
                          check_fits: bool = True, add_special_tokens: bool = False) -> list[int]:
        max_len = self.require_ready().max_model_len if check_fits else None
        return await self._tokens().encode_chat(messages, add_generation_prompt, chat_template=chat_template,
                                                template_kwargs=template_kwargs, max_model_len=max_len,
                                                add_special_tokens=add_special_tokens)

    async def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self._tokens().decode(ids, skip_special_tokens=skip_special_tokens)

    def _tokens(self) -> Tokenization:
        self.require_ready()
        assert self.tokens is not None
        return self.tokens

    def generation(self, prompts: list[list[int]], params: SamplingParams, endpoint: str, arrival: float, *,
                   priority: int = 0, pooling: list[PoolingParams] | None = None,
                   model: str | None = None) -> Generation:
        """model: the checked model name, which picks a LoRA adapter when it names one."""
        self.check_endpoint(endpoint, pooling is not None)
        if self.config.log_requests:
            log_request(endpoint, prompts, params, self.config.max_log_len)
        lora = None if model is None else self.loras.get(model)
        return Generation(
            self.engines.pick(prompts[0], lora),  # the whole request goes to one replica
            self._processor(),
            prompts,
            params,
            stall_timeout=self.config.stall_timeout,
            ping_timeout=self.config.health_timeout,
            resume_timeout=self.config.resume_timeout,
            priority=priority,
            pooling=pooling,
            lora_request=lora,
            metrics=RequestMetrics(self.metrics, endpoint, arrival),
        )
