"""The web page at `/`: choose or drop images, see each one's top-5, its branches and their agreement.

Plain static files shipped in the package (no CDN, no build step); the page talks to /v1 like
any client and asks for an API key when /v1 answers 401. `/` itself is always open.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

__all__ = ["router"]

ASSETS = {"index.html": "text/html; charset=utf-8", "page.css": "text/css; charset=utf-8",
          "page.js": "text/javascript; charset=utf-8", "icon.svg": "image/svg+xml"}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new release's page is picked up at once
    # everything from this origin only; the chosen images are shown from blob: URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}


def router() -> APIRouter:
    """Routes for the page and its assets, read from the package once, when the app is built."""
    static = files("service.api") / "static"
    page = APIRouter(include_in_schema=False)

    def add(path: str, name: str) -> None:
        body, media_type = (static / name).read_bytes(), ASSETS[name]

        async def serve() -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        page.add_api_route(path, serve, methods=["GET"], name=name)

    add("/", "index.html")
    for name in ("page.css", "page.js", "icon.svg"):
        add(f"/static/{name}", name)
    return page
