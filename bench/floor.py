"""The floor: a bare ASGI app, no framework, that streams the echo agent's tokens the same way parley does."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any
from urllib.parse import parse_qs

_TOKEN = re.compile(r"\s*\S+\s*|\s+")
DELAY = float(os.environ.get("PARLEY_ECHO_DELAY", "0"))
HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
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
