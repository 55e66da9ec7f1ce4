"""The chat page at `/`: static HTML, CSS and JS (services/frontend/ui/), no build step, no CDN.

The page talks to this frontend's own OpenAI API. With an API key set, the page itself (which
holds nothing secret) still loads, and every API call it makes carries the key the user types
into it, as any other client's must.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from services.frontend.errors import APIError

UI_DIR = Path(__file__).parent / "ui"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# the page loads only its own files and talks only to this origin
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_ui_routes(app: FastAPI) -> None:
    files = {path.name: (path.read_bytes(), _TYPES[path.suffix]) for path in UI_DIR.iterdir() if path.suffix in _TYPES}

    def serve(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"No page file named {name!r}.")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return serve("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return serve(name)
