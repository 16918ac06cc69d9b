"""Errors to HTTP, in one place: every failure parley answers a client with, its status, and the one body they all
have, ``{"status": "error", "message": ...}``. :data:`EXCEPTION_HANDLERS` is the app's Starlette exception handler
table; nothing else builds an error body.

The web layer's own failures (a request that cannot be read as sent) are defined here; the domain's are in
:mod:`parley.sessions.errors` (drawn there as a tree) and :mod:`parley.agents`:

    RequestError              400-413, raised by the web layer
     ├── BadRequest           400  a field missing, empty or malformed; a body that cannot be parsed
     ├── Unauthorized         401  no owner: no API key, a wrong or malformed one, or the host app's user is not
     │                             authenticated (auth.py); with API keys it carries WWW-Authenticate: Bearer
     ├── BodyTimeout          408  a request body that stopped arriving (PARLEY_BODY_TIMEOUT_SECONDS)
     └── PayloadTooLarge      413  a message, an upload or a whole body over its limit

    sessions.errors.ParleyError
     ├── SessionNotFound, SessionGone, FileNotFound         404  (another owner's session or file, exactly alike)
     ├── MessageNotFound                                    404
     ├── EditWithoutText                                    400
     ├── SessionBusy, SessionExists, Dequeued               409
     ├── TooManyStreams, TooManyQueued                      429  with Retry-After
     ├── CancelFailed, RejoinFailed                         500
     └── StoreUnavailable, AgentUnavailable                 503
    agents.AgentError                                       500  before the first token (after it, the stream is
     └── agents.UpstreamError                               502  aborted, or the SSE says it in an error part)
    an unknown route (404) or method (405, with Allow); a client gone mid-body (400, logged in one line);
    anything else: a bug, 500, logged once with its traceback (see telemetry.py)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ExceptionHandler

from parley import logs
from parley.agents import AgentError, UpstreamError
from parley.sessions.errors import (
    AgentUnavailable,
    CancelFailed,
    Dequeued,
    EditWithoutText,
    FileNotFound,
    MessageNotFound,
    ParleyError,
    RejoinFailed,
    SessionBusy,
    SessionError,
    SessionExists,
    StoreUnavailable,
    TooManyQueued,
    TooManyStreams,
)

logger = logging.getLogger("parley")


class RequestError(Exception):
    status_code = 400
    headers: Mapping[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RequestError):
    status_code = 400


class Unauthorized(RequestError):
    status_code = 401

    def __init__(self, message: str, *, bearer: bool) -> None:
        super().__init__(message)
        if bearer:
            self.headers = {"www-authenticate": "Bearer"}


class BodyTimeout(RequestError):
    status_code = 408


class PayloadTooLarge(RequestError):
    status_code = 413


STATUS: dict[type[Exception], int] = {
    SessionError: 404,
    FileNotFound: 404,
    MessageNotFound: 404,
    EditWithoutText: 400,
    SessionBusy: 409,
    SessionExists: 409,
    Dequeued: 409,
    TooManyStreams: 429,
    TooManyQueued: 429,
    CancelFailed: 500,
    RejoinFailed: 500,
    StoreUnavailable: 503,
    AgentUnavailable: 503,
    AgentError: 500,
    UpstreamError: 502,
}

INTERNAL_ERROR = "Internal server error: the request could not be processed."

# What each error status means, in the API's words (the OpenAPI document says it for every operation).
MEANING = {
    400: "Bad request: a field missing, empty or malformed; a body that cannot be parsed",
    404: "Not found: an unknown session, file or message (replace)",
    408: "The body stopped arriving for PARLEY_BODY_TIMEOUT_SECONDS",
    409: "Conflict: the session already has a reply in progress (if_busy reject), a waiting message was cancelled, "
    "or the ui_session_id is taken",
    413: "Payload too large",
    429: "Too many replies in progress for this owner (PARLEY_MAX_STREAMS_PER_OWNER), or messages waiting for the "
    "session (PARLEY_MAX_QUEUED); Retry-After says when to retry",
    500: "Internal server error",
    502: "The model server failed before the first token",
    503: "Unavailable: Redis is configured and unreachable (or the session's agent is not configured)",
}


def status_of(exc: BaseException) -> int | None:
    """The status ``exc`` is answered with; None for one that is not parley's to answer (a bug: 500)."""
    if isinstance(exc, RequestError):
        return exc.status_code
    return next((STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), None)


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"status": "error", "message": message}, status_code=status, headers=headers)


def _headers(exc: Exception) -> dict[str, str]:
    if isinstance(exc, RequestError):
        return dict(exc.headers)
    if isinstance(exc, TooManyStreams | TooManyQueued):
        return {"retry-after": str(exc.retry_after_seconds)}
    return {}


async def _known(request: Request, exc: Exception) -> Response:
    return error_response(status_of(exc) or 500, str(exc), _headers(exc))


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})  # whatever the exception carries (Allow on a 405)
    if exc.status_code == 404:
        message = f"Not found: {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        # Starlette's Allow names the methods of the first route that matched the path; a path served by several
        # routes (GET and POST /api/v1/sessions) allows all of theirs.
        headers["allow"] = ", ".join(sorted(_allowed_methods(request)))
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers)


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return methods


async def _client_gone(request: Request, exc: Exception) -> Response:
    # An expected event, not a server error: one line, and an answer nobody will read.
    logger.warning("client disconnected while sending %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def _bug(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware sends it (and, with debug, a traceback instead), around the telemetry that
    # gives every other response its request id: this one carries it itself.
    request_id = logs.REQUEST_ID.get()
    return error_response(500, INTERNAL_ERROR, {"x-request-id": request_id} if request_id else None)


EXCEPTION_HANDLERS: dict[Any, ExceptionHandler] = {
    RequestError: _known,
    ParleyError: _known,
    AgentError: _known,
    HTTPException: _http,
    ClientDisconnect: _client_gone,
    Exception: _bug,
}
