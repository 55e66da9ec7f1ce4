"""The FastAPI app of one frontend process: OpenAI endpoints, tokenizer endpoints, health,
version and metrics. ``build_app(config)`` is the whole interface."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from services.frontend.chat import create_chat_completion
from services.frontend.completions import create_completion
from services.frontend.errors import (
    APIError,
    bad_request,
    engine_unavailable,
    install_error_handlers,
    model_not_found,
)
from services.frontend.lora_routes import add_lora_routes, runtime_updating_allowed
from services.frontend.message_routes import add_message_routes
from services.frontend.metrics import CONTENT_TYPE
from services.frontend.middleware import ROUTE_ALIASES, FrontendMiddleware
from services.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from services.frontend.openai_responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse, now
from services.frontend.pooling import create_classify, create_embedding, create_rerank, create_score
from services.frontend.pooling_requests import (
    ClassificationRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
)
from services.frontend.response_routes import add_response_routes
from services.frontend.state import FrontendConfig, FrontendState
from services.frontend.tokenize_requests import DetokenizeRequest, TokenizeRequest
from services.frontend.ui_routes import add_ui_routes
from shared.version import VERSION


def build_app(config: FrontendConfig) -> FastAPI:
    """The app; its lifespan connects to the engine (startup) and says Goodbye (shutdown)."""
    state = FrontendState(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="pagedserve", version=VERSION, lifespan=lifespan)
    app.state.frontend = state
    install_error_handlers(app)
    app.add_middleware(FrontendMiddleware, frontend_id=state.frontend_id, metrics=state.metrics, api_key=config.api_key,
                       max_request_body_bytes=config.limits.max_request_body_bytes,
                       request_id_headers=config.request_id_headers)
    _add_openai_routes(app, state)
    _add_tokenizer_routes(app, state)
    _add_ops_routes(app, state)
    for alias, endpoint in ROUTE_ALIASES.items():  # vLLM's other paths
        route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == endpoint)
        methods = {"GET", "POST"} if alias == "/ping" else route.methods  # vLLM's /ping takes both
        app.add_api_route(alias, route.endpoint, methods=list(methods), include_in_schema=False)
    if runtime_updating_allowed():
        add_lora_routes(app, state)
    if config.enable_ui:
        add_ui_routes(app)
    return app


def _add_openai_routes(app: FastAPI, state: FrontendState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await create_embedding(state, body, request)

    @app.post("/v1/classify")
    async def classify(body: ClassificationRequest, request: Request) -> Response:
        return await create_classify(state, body, request)

    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> Response:
        return await create_score(state, body, request)

    @app.post("/v1/rerank")
    async def rerank(body: RerankRequest, request: Request) -> Response:
        return await create_rerank(state, body, request)

    add_response_routes(app, state)
    add_message_routes(app, state)

    @app.get("/v1/models")
    async def models() -> ModelList:
        info = state.require_ready()
        names = state.served_names()
        cards = [ModelCard(id=name, created=now(), root=info.model_path, max_model_len=info.max_model_len,
                           task=info.task) for name in names]
        cards += [ModelCard(id=name, created=now(), root=lora.lora_path, parent=names[0],
                            max_model_len=info.max_model_len, task=info.task)
                  for name, lora in state.loras.adapters.items()]
        return ModelList(data=cards)

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str) -> ModelCard:
        """One of /v1/models' cards (the SDK's models.retrieve); 404 for a name not served."""
        card = next((c for c in (await models()).data if c.id == model), None)
        if card is None:
            raise model_not_found(model)
        return card


def _add_tokenizer_routes(app: FastAPI, state: FrontendState) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt or of rendered messages, with no context check (as vLLM: clients
        count long texts with it); the body cap bounds the work."""
        state.check_model(body.model)
        info = state.require_ready()
        if body.messages is not None:
            messages = [m.to_template() for m in body.messages]
            ids = await state.encode_chat(messages, body.add_generation_prompt, chat_template=body.client_template,
                                          template_kwargs=body.chat_template_kwargs, check_fits=False)
        else:
            assert body.prompt is not None
            (ids,) = await state.encode([body.prompt], add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=info.max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.check_model(body.model)
        info = state.require_ready()
        bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is out of range for a vocabulary of {info.vocab_size}.", "tokens")
        return DetokenizeResponse(prompt=await state.decode(body.tokens))


def _add_ops_routes(app: FastAPI, state: FrontendState) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 only when the engine's step loop answers a ping in time and has all its workers
        (with data-parallel replicas: one of them, since any can take new requests)."""
        try:
            state.require_ready()
        except APIError as exc:
            return exc.response()
        if state.engines.draining:  # a probe on a kept-alive connection while open requests finish
            return engine_unavailable("The frontend is shutting down.").response()
        pong = await state.engines.ping(state.config.health_timeout)
        if pong is None:
            return engine_unavailable("The engine did not answer a health ping in time.").response()
        if not pong.workers_ready:
            return engine_unavailable("The engine has lost a worker; requests wait until it is back.").response()
        return Response(status_code=200)

    @app.get("/load")
    async def load() -> JSONResponse:
        """vLLM's: the requests this frontend is serving (generation and pooling, sent to the engine)."""
        return JSONResponse({"server_load": state.metrics.serving})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": VERSION})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)
