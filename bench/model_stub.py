"""A minimal OpenAI-compatible model server for benchmark 6: it streams at once, and stamps its first token.

Each token's text is ``T<time.perf_counter()>T``, taken just before the token is sent. ``perf_counter`` is
CLOCK_MONOTONIC on Linux, one clock for every process on the machine, so the client can tell, from the text alone,
how long the token took to reach it: straight from this server, or through parley's ``openai`` agent.
(tests/openai_stub.py is the tests' fuller stub; it waits between tokens and splits events, which would
blur a latency figure.)
"""

from __future__ import annotations

import json
import time
from typing import Any

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
TOKENS = 3


def _event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
    chunk["choices"] = [choice]
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    for _ in range(TOKENS):
        event = _event({"content": f"T{time.perf_counter():.6f}T "})
        await send({"type": "http.response.body", "body": event, "more_body": True})
    done = _event({}, finish_reason="stop") + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": done, "more_body": False})
