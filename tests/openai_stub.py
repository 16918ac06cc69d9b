"""A real OpenAI-compatible chat-completions server for tests: it streams slowly and notices its client leave.

The ``model`` of a request picks the behaviour: ``tokens`` (the normal stream), ``unauthorized`` (401),
``broken`` (500), ``garbage`` (200 with a body that is no JSON), ``hang-before`` (no answer at all),
``hang-mid`` (two tokens, then silence), ``error-event`` (a token, then an error object in the stream),
``tools`` (a model that calls tools: the next round of ``tool_plan`` that the conversation has not made yet, then,
once every round is made, its tokens).

Every stream may begin with ``reasoning`` (under ``reasoning_field``: vLLM and Ollama say ``reasoning``, llama.cpp
and DeepSeek ``reasoning_content``) and ends with a usage chunk when the request asks for one. Tool calls are cut
as ``fragments`` says: ``index`` (the id and name first, the arguments in pieces), ``late-name`` (the arguments
before the name), ``whole`` (each call in one delta), ``together`` (all the calls of a round in one delta, then
their arguments interleaved), ``no-index`` (whole calls without an ``index``, as Google's layer sends them).

Like a real server it refuses (400) a conversation that is not valid: a tool call not answered by a ``tool``
message, a ``tool`` message that answers no call, arguments that are not JSON; and with ``deepseek`` set, a
tool-call turn whose ``reasoning_content`` was dropped.
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
    refused: str | None = None
    received_at: float = field(default_factory=time.time)  # (the wall clock: other processes compare with it)
    last_fragment_at: float | None = None  # when the last tool-call fragment was sent
    client_left_at: float | None = None
    tokens_when_left: int | None = None  # tokens_sent at the moment the client left
    over: bool = False  # the response's task has ended: nothing more can be generated


@dataclass
class OpenAIStub:
    tokens: list[str] = field(default_factory=lambda: [f"tok{i} " for i in range(10)])
    delay: float = 0.02
    calls: list[StubCall] = field(default_factory=list)
    behaviour: str | None = None  # when set, it overrides the requests' model (one server, several behaviours)
    reasoning: list[str] = field(default_factory=list)
    reasoning_field: str = "reasoning_content"
    # For ``tools``: the rounds of tool calls the model makes, each a list of {"name", "arguments"} (a dict, or
    # a string sent as it is, valid JSON or not).
    tool_plan: list[list[dict[str, Any]]] = field(default_factory=list)
    fragments: str = "index"
    deepseek: bool = False
    knows_stream_options: bool = True  # False: refuses a request that has them, as some older servers do

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
        problem = invalid_conversation(call.body.get("messages"), deepseek=self.deepseek)
        if not self.knows_stream_options and "stream_options" in call.body:
            problem = "Unrecognized request argument supplied: stream_options"
        if problem is not None:
            call.refused = problem
            await _json(send, 400, {"error": {"message": problem, "type": "invalid_request_error"}})
            return
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
        for piece in self.reasoning:
            await anyio.sleep(self.delay)
            await _body(send, _event({self.reasoning_field: piece}))
        if model == "tools":
            made = sum(1 for m in call.body["messages"] if m.get("role") == "assistant" and m.get("tool_calls"))
            since_user = _rounds_since_user(call.body["messages"])
            if since_user < len(self.tool_plan):
                await self._tool_calls(send, self.tool_plan[since_user], made)
                call.last_fragment_at = time.time()
                await self._finish(call, send, "tool_calls")
                return
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
        await self._finish(call, send, "stop")

    async def _finish(self, call: StubCall, send: Send, reason: str) -> None:
        await _body(send, _event({}, finish_reason=reason))
        if (call.body.get("stream_options") or {}).get("include_usage"):
            prompt = len(json.dumps(call.body["messages"])) // 4
            completion = call.tokens_sent + len(self.reasoning)
            usage: dict[str, Any] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            if self.reasoning:
                usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning)}
            chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time())}
            await _body(
                send,
                b"data: " + json.dumps({**chunk, "model": "stub", "choices": [], "usage": usage}).encode() + b"\n\n",
            )
        await _body(send, b"data: [DONE]\n\n")
        await _body(send, b"", more=False)

    async def _tool_calls(self, send: Send, plan: list[dict[str, Any]], made: int) -> None:
        """One round of tool calls, cut into deltas as ``fragments`` says."""
        calls = []
        for number, planned in enumerate(plan):
            arguments = planned.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append((number, f"call_{made}_{number}", planned["name"], text))

        def pieces(text: str) -> list[str]:
            return [text[i : i + 5] for i in range(0, len(text), 5)] or [""]

        deltas: list[list[dict[str, Any]]] = []
        if self.fragments == "index":
            for index, call_id, name, text in calls:
                deltas.append(
                    [{"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]
                )
                deltas.extend([[{"index": index, "function": {"arguments": p}}] for p in pieces(text)])
        elif self.fragments == "late-name":
            for index, call_id, name, text in calls:
                first, *rest = pieces(text)
                deltas.append([{"index": index, "id": call_id, "type": "function", "function": {"arguments": first}}])
                deltas.append([{"index": index, "function": {"name": name}}])
                deltas.extend([[{"index": index, "function": {"arguments": p}}] for p in rest])
        elif self.fragments == "whole":
            for index, call_id, name, text in calls:
                deltas.append(
                    [{"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": text}}]
                )
        elif self.fragments == "together":
            deltas.append(
                [
                    {"index": i, "id": c, "type": "function", "function": {"name": n, "arguments": ""}}
                    for i, c, n, _ in calls
                ]
            )
            split = [pieces(text) for *_, text in calls]
            for round_ in range(max(len(p) for p in split)):
                deltas.append(
                    [{"index": i, "function": {"arguments": p[round_]}} for i, p in enumerate(split) if round_ < len(p)]
                )
        elif self.fragments == "no-index":
            for _, call_id, name, text in calls:
                deltas.append([{"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}])
        else:
            raise ValueError(f"unknown fragments: {self.fragments}")
        for delta in deltas:
            await anyio.sleep(self.delay)
            await _body(send, _event({"tool_calls": delta}))


def _rounds_since_user(messages: list[dict[str, Any]]) -> int:
    rounds = 0
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "assistant" and message.get("tool_calls"):
            rounds += 1
    return rounds


def invalid_conversation(messages: Any, *, deepseek: bool = False) -> str | None:
    """Why a real server would refuse these messages, or None: every tool call answered by a ``tool`` message
    right after it (in any order), no ``tool`` message that answers nothing, arguments that are JSON."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    waiting: set[str] = set()
    for number, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in waiting:
                return f"messages[{number}]: a 'tool' message must answer a preceding tool call"
            if not isinstance(message.get("content"), str):
                return f"messages[{number}]: a 'tool' message's content must be a string"
            waiting.discard(message["tool_call_id"])
            continue
        if waiting:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {sorted(waiting)}"
            )
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                try:
                    json.loads(call["function"]["arguments"])
                except (KeyError, TypeError, ValueError):
                    return f"messages[{number}]: the arguments of a tool call must be JSON"
                waiting.add(call["id"])
            if deepseek and "reasoning_content" not in message:
                return f"Missing `reasoning_content` field in the assistant message at message index {number}"
    if waiting:
        return f"tool calls without a response: {sorted(waiting)}"
    return None


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
