"""The Responses API's routes: create, retrieve (or stream a background response again),
input_items, cancel and delete, over one store of responses and their background tasks."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from services.frontend.errors import bad_request
from services.frontend.response_background import BackgroundResponses
from services.frontend.response_store import ResponseStore
from services.frontend.responses import create_response, item_page, not_found
from services.frontend.responses_requests import ResponsesRequest
from services.frontend.state import FrontendState
from services.frontend.streaming import sse


def add_response_routes(app: FastAPI, state: FrontendState) -> None:
    store = ResponseStore(state.config.response_store_max_entries, state.config.response_store_ttl,
                          registry=state.metrics.registry, model=lambda: state.metrics.model)
    background = BackgroundResponses(store)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(state, store, background, body, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, stream: bool = False, starting_after: int = -1) -> Response:
        stored = store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        if not stream:
            return JSONResponse(stored.response)
        events = background.stream(response_id, starting_after)
        if events is None:
            raise bad_request("Only a background response can be streamed again (background: true).", "stream")
        return sse(events)

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", after: str | None = None) -> JSONResponse:
        stored = store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return JSONResponse(item_page(stored.input_items, limit, order, after))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> JSONResponse:
        if response_id not in store:
            raise not_found(response_id)
        if not await background.cancel(response_id):
            raise bad_request("Only a background response can be cancelled (background: true).", "response_id")
        stored = store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return JSONResponse(stored.response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        await background.cancel(response_id)  # a running one stops first (it would store itself again)
        if not store.delete(response_id):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
