"""A real OpenAI-compatible chat-completions server for tests: it streams slowly and notices its client leave.

The ``model`` of a request picks the behaviour: ``tokens`` (the normal stream), ``unauthorized`` (401),
``broken`` (500), ``garbage`` (200 with a body that is no JSON), ``hang-before`` (no answer at all),
``hang-mid`` (two tokens, then silence), ``error-event`` (a token, then an error object in the stream).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send


@dataclass
class StubCall:
    body: dict[str, Any]
    headers: dict[str, str]
    tokens_sent: int = 0
    finished: bool = False
    client_left_at: float | None = None
    tokens_when_left: int | None = None  # tokens_sent at the moment the client left
    over: bool = False  # the response's task has ended: nothing more can be generated


@dataclass
class OpenAIStub:
    tokens: list[str] = field(default_factory=lambda: [f"tok{i} " for i in range(10)])
    delay: float = 0.02
    calls: list[StubCall] = field(default_factory=list)
    behaviour: str | None = None  # when set, it overrides the requests' model (one server, several behaviours)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions":
            await _json(send, 404, {"error": {"message": "no such route"}})
            return
        call = StubCall(json.loads(body), {k.decode(): v.decode() for k, v in scope["headers"]})
        self.calls.append(call)
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    call.client_left_at = time.monotonic()
                    call.tokens_when_left = call.tokens_sent
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._respond(call, send)
                call.finished = True
                tg.cancel_scope.cancel()
        finally:
            call.over = True

    async def _respond(self, call: StubCall, send: Send) -> None:
        model = self.behaviour or call.body.get("model")
        if model == "unauthorized":
            error = {"message": "Incorrect API key provided: sk-abc123456789xyz.", "type": "invalid_request_error"}
            await _json(send, 401, {"error": error})
            return
        if model == "broken":
            await _json(send, 500, {"error": {"message": "The server had an error", "type": "server_error"}})
            return
        if model == "hang-before":
            await anyio.sleep_forever()
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if model == "garbage":
            await _body(send, b"data: this is not json\n\n")
            await _body(send, b"", more=False)
            return
        await _body(send, b": keep-alive comment\r\n\r\n")
        await _body(send, _event({"role": "assistant", "content": ""}))
        for index, token in enumerate(self.tokens):
            if model == "hang-mid" and index == 2:
                await anyio.sleep_forever()
            if model == "error-event" and index == 1:
                await _body(send, b"data: " + json.dumps({"error": {"message": "overloaded"}}).encode() + b"\n\n")
                await _body(send, b"", more=False)
                return
            await anyio.sleep(self.delay)
            event = _event({"content": token})
            # Cut each event in two network writes, so the client must put it back together.
            await _body(send, event[:7])
            await _body(send, event[7:])
            call.tokens_sent += 1
        await _body(send, _event({}, finish_reason="stop"))
        await _body(send, b"data: [DONE]\n\n")
        await _body(send, b"", more=False)


def _event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "stub",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await _body(send, body, more=False)
