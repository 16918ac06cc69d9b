"""The floor: a bare ASGI app, no framework, that streams the echo agent's tokens the same way parley does.

It is the physical reference for the same process shape as ``uvicorn app:app``, so its lifespan applies the same
garbage-collector settings (:func:`parley.gc_tuning.tune_for_streams`, which parley's lifespan calls when it owns
its process): a floor on CPython's defaults stalls on full collections past a few thousand streams, and parley
would then beat its own floor for a reason that is not the app's.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any
from urllib.parse import parse_qs

from parley.gc_tuning import tune_for_streams

_TOKEN = re.compile(r"\s*\S+\s*|\s+")
DELAY = float(os.environ.get("PARLEY_ECHO_DELAY", "0"))
HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            tune_for_streams()  # at the same moment as parley's: once the app is loaded, before the first request
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    fields = parse_qs(body.decode())
    text = fields.get("message", [""])[0]
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    for token in _TOKEN.findall(text):
        await asyncio.sleep(DELAY)
        await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
