"""A host's own Starlette app that mounts parley under ``/chat`` and does not run parley's lifespan (a mounted app's
lifespan never runs): ``uvicorn tests.hosted:app``, for tests/test_embedding.py. parley's settings come from the
environment (PARLEY_*), passed to ``create_app``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from parley.app import create_app
from parley.settings import Settings


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host is up")


app = Starlette(routes=[Route("/healthz", healthz), Mount("/chat", app=create_app(Settings.from_env()))])
