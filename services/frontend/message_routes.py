"""Anthropic's Messages API routes: POST /v1/messages and /v1/messages/count_tokens. Their errors
(a bad body included, which FastAPI finds before the handler runs) are answered in Anthropic's
shape by the routes' own class; every other endpoint keeps OpenAI's."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.frontend.errors import APIError, validation_error
from services.frontend.messages import count_message_tokens, create_message, error_response
from services.frontend.messages_requests import MessageCountRequest, MessagesRequest, untagged
from services.frontend.state import FrontendState

log = logging.getLogger(__name__)


class AnthropicRoute(APIRoute):
    """A route whose errors are answered in Anthropic's shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def handle_in_shape(request: Request) -> Response:
            try:
                return await handle(request)
            except APIError as exc:
                return error_response(exc)
            except RequestValidationError as exc:
                return error_response(validation_error(untagged(list(exc.errors()))))
            except StarletteHTTPException as exc:  # e.g. the body cap, raised while the body is read
                detail = exc.detail if isinstance(exc.detail, APIError) else APIError(exc.status_code, str(exc.detail))
                return error_response(detail)
            except Exception as exc:
                log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
                return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))

        return handle_in_shape


def add_message_routes(app: FastAPI, state: FrontendState) -> None:
    router = APIRouter(route_class=AnthropicRoute)

    @router.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await create_message(state, body, request)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(body: MessageCountRequest) -> Response:
        return await count_message_tokens(state, body)

    app.include_router(router)
