"""A plain ASGI middleware (not BaseHTTPMiddleware, which would get between a streaming response
and the client's disconnect): API-key check on /v1/*, the answering frontend's id as a
response header, and the HTTP responses counter by endpoint and status."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from services.frontend.errors import unauthorized
from services.frontend.metrics import FrontendMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

FRONTEND_HEADER = b"x-pagedserve-frontend"
PROTECTED_PREFIX = "/v1/"


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class FrontendMiddleware:
    def __init__(self, app: ASGIApp, *, frontend_id: str, metrics: FrontendMetrics, api_key: str | None):
        self.app = app
        self.frontend_id = frontend_id.encode()
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or not scope["path"].startswith(PROTECTED_PREFIX):
            return True
        token = _bearer_token(scope)
        return token is not None and hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, the server's error handler answers 500

        async def send_with_header(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (FRONTEND_HEADER, self.frontend_id)]}
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_with_header)
            else:
                await self._reject(send_with_header)
        finally:
            self.metrics.count_response(scope["path"], status)

    @staticmethod
    async def _reject(send: Callable[[Message], Awaitable[None]]) -> None:
        response = unauthorized().response()
        response.headers["www-authenticate"] = "Bearer"
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
