"""The chat page: ``GET /`` and its script and stylesheet under ``/ui/``, all three files beside this module.

They ship as this package's data (pyproject.toml's ``package-data``): an installed wheel serves them as a checkout
does.

The page's URLs are relative, so it works wherever parley is mounted. Its Content-Security-Policy allows only
its own files: no inline script, nothing from another origin.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from parley.openapi import served_file

UI_DIR = Path(__file__).resolve().parent

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidated on each load (cheap: an ETag), so a new release's page never runs an old script.
    "cache-control": "no-cache",
}


def _file(name: str, media_type: str, operation_id: str, summary: str) -> Route:
    path = UI_DIR / name

    # Public even with API keys: the page asks for the key itself.
    @served_file(operation_id, summary, media_type.partition(";")[0], public=True)
    async def serve(request: Request) -> Response:
        return FileResponse(path, media_type=media_type, headers=HEADERS)

    return Route("/" if name == "index.html" else f"/ui/{name}", serve, methods=["GET", "HEAD"], name=f"ui:{name}")


routes: list[BaseRoute] = [
    _file("index.html", "text/html; charset=utf-8", "page", "The chat page"),
    _file("app.js", "text/javascript; charset=utf-8", "pageScript", "The chat page's script"),
    _file("style.css", "text/css; charset=utf-8", "pageStyle", "The chat page's style sheet"),
]
