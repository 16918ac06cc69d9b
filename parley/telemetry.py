"""What every HTTP request goes through: its request id, its metrics, and the line for a 5xx."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Awaitable
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    import sniffio
except ImportError:  # (anyio then takes the event loop for asyncio's, at no cost per call)
    sniffio = None  # type: ignore[assignment]

from parley import logs
from parley.metrics import Metrics, RequestMetrics

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_BODY_LIMIT = 4096


class Telemetry:
    """ASGI middleware: an ``X-Request-Id`` on every response (the client's, when it sent a sane one, or a new
    one) and in every log line of the request; ``parley_http_*`` metrics by route template (when
    ``metrics``); one log line per 5xx, with its error. An exception that escapes before the response
    started (a bug) is logged here once, with its traceback, in parley's words; Starlette's ServerErrorMiddleware,
    around every middleware, answers it (see the app's exception handlers)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = RequestMetrics(metrics) if metrics is not None else None
        _number_requests()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        # Not reset at the end: uvicorn runs each request in a task of its own, so the id stays in that task's
        # context, where uvicorn logs the request's own lines (its access line, its "Exception in ASGI application").
        logs.REQUEST_ID.set(request_id)
        if sniffio is not None:
            # anyio asks sniffio which event loop runs on every call (a chat makes a few dozen), and sniffio sniffs
            # for asyncio each time unless the task says, as anyio.run's tasks do. The turn's task, started from
            # this one, inherits it.
            sniffio.current_async_library_cvar.set(sniffio.current_async_library())
        id_header = (b"x-request-id", request_id.encode())
        status = 0
        error_body: list[bytes] | None = None
        started = perf_counter()

        def send_with_id(message: Message) -> Awaitable[None]:
            # A plain function that returns send's awaitable: no coroutine of its own on every token of a stream.
            nonlocal status, error_body
            if status == 0 and message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
                if status >= 500:
                    error_body = []
            elif error_body is not None and message["type"] == "http.response.body":
                error_body.append(message.get("body", b"")[:_ERROR_BODY_LIMIT])
            return send(message)

        failure: Exception | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status == 0:  # a bug: Starlette's ServerErrorMiddleware, around this, answers it with a 500
                failure, status = exc, 500
                logs.logged_here(exc)  # (and the server's own report of it is dropped)
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            if self.metrics is not None and status:
                self.metrics.observe(method, route, status, perf_counter() - started)
            if status >= 500:
                error = _error_message(error_body) if failure is None else f"{type(failure).__name__}: {failure}"
                logs.failed_request(method, route, status, error, failure)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(value):
                return str(value.decode())
            break
    return f"{_id_prefix}{next(_id_counter):08x}"


def _new_id_prefix() -> None:
    # A random prefix per process and a counter: unique ids without a random draw (a system call) per request.
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_counter = "", itertools.count()


def _number_requests() -> None:
    # When the first app is made, not on import: importing parley changes nothing in the process.
    if not _id_prefix:
        _new_id_prefix()
        os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker must not repeat its parent's ids


def _error_message(body: list[bytes] | None) -> str:
    try:
        message: Any = json.loads(b"".join(body or ()))["message"]
    except (ValueError, KeyError, TypeError):
        return "(no error message)"
    return str(message)
