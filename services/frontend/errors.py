"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers here turn every failure the app can meet (our own APIError, FastAPI's request
validation errors, malformed JSON, unknown routes, unexpected exceptions) into that shape, so a
bad request gets a clear answer and never takes the process down.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.frontend.request_body import NESTED_ERROR, WIRE_ERROR
from shared.processor.errors import InvalidRequest

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


# Anthropic's Messages API answers its errors in Anthropic's shape ({"type": "error", "error": {"type",
# "message"}}): those of its routes, and those answered before a route runs (401, 413, 404, 405)
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}


# codes for the errors the framework raises itself (a 400 there is a body that could not be read)
_HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}


class APIError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        error_type = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The answer on ``path`` (the app's path, see app_path): Anthropic's shape under
        /v1/messages, OpenAI's elsewhere."""
        anthropic = path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")
        return JSONResponse(self.anthropic_body() if anthropic else self.body(), status_code=self.status)


def app_path(scope: dict[str, Any]) -> str:
    """The path the routes see: under ``--root-path`` uvicorn puts the prefix in front of the
    client's path (ASGI's rule) and the router takes it off again."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    msg = f"The model `{name}` does not exist or you do not have access to it."
    return APIError(404, msg, param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' "
                    "(or Anthropic's 'x-api-key: <key>').", code="invalid_api_key")


def body_too_large(limit: int) -> APIError:
    msg = f"The request body is larger than this server accepts ({limit} bytes)."
    return APIError(413, msg, code="request_too_large")


def engine_unavailable(message: str = "The engine is not available; try again shortly.") -> APIError:
    return APIError(503, message, code="engine_unavailable")


def from_value_error(exc: ValueError, known_params: set[str]) -> APIError:
    """A 400 for a ValueError raised while building a request: the processor's InvalidRequest
    names its parameter; others (e.g. SamplingParams's) when the message starts with one
    ("temperature must be ...")."""
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc), exc.param, exc.code)
    message = str(exc)
    first = message.split(" ", 1)[0]
    return bad_request(message, param=first if first in known_params else None)


def _format_loc(loc: tuple[Any, ...]) -> tuple[str | None, str]:
    """(top-level parameter, readable path) from a pydantic error location."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)  # where FastAPI found it
    if not parts:
        return None, ""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return (str(parts[0]) if isinstance(parts[0], str) else None), path


def _union_tag(loc: tuple[Any, ...]) -> str | None:
    """The alternative a union error is about ('str', 'list[int]'), if loc names one."""
    return loc[2] if len(loc) > 2 and isinstance(loc[2], str) else None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 for FastAPI's request validation errors: the first problem, named."""
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    if err.get("type") == WIRE_ERROR:  # found by the whole-body check, which names the field itself
        return bad_request(str(err.get("msg")), param=(err.get("ctx") or {}).get("param"))
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
        return bad_request(f"Invalid JSON in the request body: {detail}", code="invalid_json")
    param, path = _format_loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == NESTED_ERROR:  # names the very place: 'messages[0].content[1].type'
        path += (err.get("ctx") or {}).get("below", "")
        return bad_request(f"Invalid value for '{path}': {msg}.", param=path)
    if param is None and err.get("type") == "value_error":  # a check across fields names its field first
        first = msg.split(" ", 1)[0]
        return bad_request(msg, param=first if first.isidentifier() else None)
    if param is None:
        if err.get("type") == "missing":
            return bad_request("A JSON request body is required.", code="invalid_json")
        return bad_request(f"The request body is not a valid request: {err.get('msg', '')}", code="invalid_json")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{path}'.", param=param, code="missing_required_parameter")
    same = [e for e in errors if _format_loc(tuple(e.get("loc", ())))[0] == param]
    tags = [_union_tag(tuple(e.get("loc", ()))) for e in same]
    if len(same) > 1 and all(tags) and len(set(tags)) > 1:  # a union: no alternative matched
        return _union_error(param, same, tags)
    code = "invalid_type" if str(err.get("type", "")).endswith("_type") else "invalid_value"
    return bad_request(f"Invalid value for '{path}': {msg}", param=param, code=code)


def _union_error(param: str, errors: list[dict[str, Any]], tags: list[str | None]) -> APIError:
    """A union no alternative matched: the value's problem when one alternative has the value's
    type ('input[0]': a negative token id), else the types it may have."""
    fits = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    if fits and len({_union_tag(tuple(e["loc"])) for e in fits}) == 1:
        loc = tuple(fits[0]["loc"])
        _, path = _format_loc(loc[:2] + loc[3:])  # the alternative's name is no place in the body
        return bad_request(f"Invalid value for '{path}': {fits[0].get('msg', 'invalid value')}", param=param)
    kinds = ", ".join(dict.fromkeys(str(t).replace("constrained-", "") for t in tags))
    return bad_request(f"Invalid type for '{param}': expected one of {kinds}.", param=param, code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, APIError):  # raised where only an HTTPException gets through
            return exc.detail.response(app_path(request.scope))
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        return APIError(exc.status_code, str(exc.detail), code=code).response(app_path(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
        return APIError(500, f"Internal server error: {type(exc).__name__}", code="internal_error").response()
