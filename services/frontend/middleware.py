"""A plain ASGI middleware (not BaseHTTPMiddleware, which would get between a streaming response
and the client's disconnect): API-key check on /v1/* and the tokenizer endpoints, the request
body size cap, Retry-After on every 503, the answering frontend's id as a response header (and,
with --enable-request-id-headers, an X-Request-Id), and the HTTP responses counter by endpoint
and status."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException

from services.frontend.errors import APIError, app_path, body_too_large, unauthorized
from services.frontend.metrics import FrontendMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FRONTEND_HEADER = b"x-pagedserve-frontend"
REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_BYTES = 256  # a client's longer X-Request-Id is not echoed: the answer gets a fresh one
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
RETRY_AFTER_S = b"2"  # what a 503 asks clients to wait (the official SDK honours it)


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    return next((value for name, value in scope.get("headers", ()) if name == wanted), None)


def client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id when it is one this server takes (1 to MAX_REQUEST_ID_BYTES of
    ASCII): echoed with --enable-request-id-headers, and the answer's id as in vLLM."""
    given = _header(scope, REQUEST_ID_HEADER)
    ok = given is not None and 0 < len(given) <= MAX_REQUEST_ID_BYTES and given.isascii()
    return given.decode() if ok else None


def _bearer_token(scope: Scope) -> bytes | None:
    """The token of the one Authorization header (two are ambiguous: no token)."""
    values = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


# vLLM's other paths for the same endpoints: keyed and counted as the endpoint itself
ROUTE_ALIASES = {"/score": "/v1/score", "/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank", "/ping": "/health",
                 "/classify": "/v1/classify"}


def _route_path(scope: Scope) -> str:
    """The endpoint the routes serve (an alias is its endpoint)."""
    path = app_path(scope)
    return ROUTE_ALIASES.get(path, path)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that counts body bytes as they stream in (chunked bodies have no length) and
    raises 413 past ``limit``, before the app holds more than that."""
    total = 0

    async def receive_limited() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:  # an HTTPException is what FastAPI lets through from a body read
                raise HTTPException(413, detail=body_too_large(limit))
        return message

    return receive_limited


class FrontendMiddleware:
    def __init__(self, app: ASGIApp, *, frontend_id: str, metrics: FrontendMetrics, api_key: str | None,
                 max_request_body_bytes: int, request_id_headers: bool = False):
        self.app = app
        self.frontend_id = frontend_id.encode()
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_request_body_bytes = max_request_body_bytes
        self.request_id_headers = request_id_headers

    def _headers(self, scope: Scope, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The headers this middleware adds to an answer."""
        extra = [(FRONTEND_HEADER, self.frontend_id)]
        if status == 503 and not any(name.lower() == b"retry-after" for name, _ in headers):
            extra.append((b"retry-after", RETRY_AFTER_S))
        if self.request_id_headers:
            given = client_request_id(scope)
            extra.append((REQUEST_ID_HEADER, given.encode() if given else uuid.uuid4().hex.encode()))
        return extra

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or not _route_path(scope).startswith(PROTECTED_PREFIXES):
            return True
        keys = [value for name, value in scope.get("headers", ()) if name == b"x-api-key"]  # Anthropic's clients
        token = _bearer_token(scope) or (keys[0].strip() if len(keys) == 1 else None)
        return token is not None and hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, the server's error handler answers 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                message = {**message, "headers": headers + self._headers(scope, status, headers)}
            await send(message)

        try:
            if not self._authorized(scope):
                await self._reject(unauthorized(), scope, send_with_headers, {"www-authenticate": "Bearer"})
            elif (_content_length(scope) or 0) > self.max_request_body_bytes:
                await self._reject(body_too_large(self.max_request_body_bytes), scope, send_with_headers,
                                   {"connection": "close"})
            else:
                await self.app(scope, _limited(receive, self.max_request_body_bytes), send_with_headers)
        finally:
            self.metrics.count_response(_route_path(scope), status)

    @staticmethod
    async def _reject(error: APIError, scope: Scope, send: Send, headers: dict[str, str]) -> None:
        """Answer ``error`` without running the app (nor reading the body), in its route's shape."""
        response = error.response(app_path(scope))
        response.headers.update(headers)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
