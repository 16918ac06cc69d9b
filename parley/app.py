"""The app: every route, the error table, and how the parts are put together (:func:`create_app`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from parley import gc_tuning, logs, metrics, page
from parley.agents import Agents, Attachment, tools_of
from parley.auth import Auth, keys_from
from parley.errors import EXCEPTION_HANDLERS, BadRequest, PayloadTooLarge, Unauthorized
from parley.forms import (
    FORM_MARGIN_BYTES,
    OPTIONS_BODY_BYTES,
    SESSION_ID,
    bounded,
    chat_body_limit,
    header,
    optional_text,
    query_int,
    read_chat,
    read_form,
    read_json_or_form,
    required_text,
)
from parley.health import readiness
from parley.openapi import document
from parley.rejoin import Follow, after_seq
from parley.service import Parley, build
from parley.sessions import Store
from parley.sessions.errors import (
    CancelFailed,
    EventLoopUnsupported,
    FileNotFound,
    SessionNotFound,
    StoreUnavailable,
)
from parley.sessions.files import FileTooLarge, content_disposition, is_text, mime_type, safe_filename
from parley.sessions.store import FileInfo, Session, new_id, utcnow
from parley.sessions.turns import TurnObserver, TurnRequest
from parley.settings import Settings, SettingsError
from parley.streaming import ChatResponse, OnDisconnect, PlainText
from parley.telemetry import Telemetry
from parley.ui_messages import ServerSentEvents
from parley.uploads import receive_upload

logger = logging.getLogger("parley")


async def _parley(request: Request) -> tuple[Parley, str]:
    """The app's parts, and the owner the request acts for (401 when it has none: see auth.py)."""
    parley: Parley = request.app.state.parley
    owner = request.app.state.auth.owner(request.scope)
    if owner is None:
        bearer = "user" not in request.scope  # a host app's users sign in the host's way, not with our keys
        raise Unauthorized(
            "Authentication required: send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            if bearer
            else "Authentication required.",
            bearer=bearer,
        )
    return await parley.ready(), owner


async def _session(parley: Parley, session_id: str, owner: str) -> Session:
    # Another owner's session is answered exactly like one that does not exist.
    session = await parley.store.get_session(session_id, owner)
    if session is None:
        raise SessionNotFound(session_id)
    return session


# sessions


async def create_session(request: Request) -> Response:
    parley, owner = await _parley(request)
    options = await read_json_or_form(bounded(request, OPTIONS_BODY_BYTES, parley.settings.body_timeout_seconds))
    # A field left out (or JSON null) takes its default; one that is present must be valid: false, 0 or ""
    # are mistakes to report, not requests for the default.
    agent = options.get("agent")
    if agent is None or agent == "":
        agent = parley.agents.default
    if not isinstance(agent, str) or agent not in parley.agents:
        raise BadRequest(f"Unknown agent: {json.dumps(agent)}. GET /api/v1/agents lists the agents.")
    session_id = options.get("ui_session_id")
    if session_id is None:
        session_id = new_id("ses_")
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise BadRequest("ui_session_id must be 1 to 128 characters: letters, digits, '_' or '-'.")
    session = Session(session_id, agent, utcnow(), owner)
    await parley.store.create_session(session)
    return JSONResponse(session.to_json(), status_code=201)


async def list_sessions(request: Request) -> Response:
    parley, owner = await _parley(request)
    limit = query_int(request, "limit", 50, minimum=1, maximum=1000)
    offset = query_int(request, "offset", 0, minimum=0, maximum=2**31)
    sessions = await parley.store.list_sessions(owner, limit, offset)
    return JSONResponse({"sessions": [session.to_json() for session in sessions]})


async def get_session(request: Request) -> Response:
    parley, owner = await _parley(request)
    session = await _session(parley, request.path_params["session_id"], owner)
    await parley.interrupt_orphans(session.ui_session_id)
    streaming = await parley.interactions.is_streaming(session.ui_session_id)
    return JSONResponse({**session.to_json(), "status": "streaming" if streaming else "idle"})


async def delete_session(request: Request) -> Response:
    parley, owner = await _parley(request)
    session = await _session(parley, request.path_params["session_id"], owner)
    try:
        await parley.interactions.cancel_and_wait(session.ui_session_id, reason="deleted")
    except CancelFailed:
        # Its owner is dead or silent: delete anyway. The delete takes the claim with it, so an owner that
        # comes back finds its session gone at its next renewal, and stops.
        logger.warning("session %s: its owner did not answer the cancel; deleting anyway", session.ui_session_id)
    # The files whose records went with the session, in the same transaction: an upload that lands meanwhile
    # is either among them or finds the session gone (and removes its own blob).
    for file_id in await parley.store.delete_session(session.ui_session_id, owner) or ():
        await parley.blobs.delete(file_id)
    return JSONResponse({"status": "success", "message": f"Session {session.ui_session_id} deleted"})


async def list_messages(request: Request) -> Response:
    parley, owner = await _parley(request)
    session = await _session(parley, request.path_params["session_id"], owner)
    await parley.interrupt_orphans(session.ui_session_id)
    messages = await parley.store.list_messages(session.ui_session_id)
    return JSONResponse({"messages": [message.to_json() for message in messages]})


# chat


async def chat(request: Request) -> Response | ChatResponse:
    parley, owner = await _parley(request)
    limit = parley.settings.max_message_bytes
    body = bounded(request, chat_body_limit(request, limit), parley.settings.body_timeout_seconds)
    chat = await read_chat(body, max_message_bytes=limit)
    session_id, file_ids = chat.session_id, chat.file_ids
    attachments: list[Attachment] = []
    if file_ids:  # (without files, the turn runner checks the session and its owner before it claims it)
        await _session(parley, session_id, owner)
        attachments = await _attachments(parley, session_id, file_ids)
    # (A turn left streaming by a process that died is recorded interrupted when the session is claimed.)
    turn = TurnRequest(session_id, chat.message, file_ids, attachments, owner)
    on_disconnect: OnDisconnect = (
        "continue" if (chat.on_disconnect or parley.settings.on_disconnect) == "continue" else "cancel"
    )
    stall = parley.settings.body_timeout_seconds  # (a client may stall reading a reply as long as sending a body)
    if _wants_sse(request, chat.ai_sdk):
        keepalive = parley.settings.sse_keepalive_seconds
        return ChatResponse(parley.runner, turn, ServerSentEvents, on_disconnect, keepalive, stall)
    return ChatResponse(parley.runner, turn, PlainText, on_disconnect, stall_seconds=stall)


def _wants_sse(request: Request, ai_sdk: bool) -> bool:
    """SSE when the client asks for it, or sends the AI SDK's body without asking for plain text alone."""
    accept = header(request, b"accept").lower()
    if "text/event-stream" in accept:
        return True
    return ai_sdk and [part.split(";")[0].strip() for part in accept.split(",")] != ["text/plain"]


async def rejoin(request: Request) -> Response | Follow:
    parley, owner = await _parley(request)
    session = await _session(parley, request.path_params["session_id"], owner)
    interaction, feed = parley.interactions.get(session.ui_session_id), None
    if interaction is not None and not interaction.message_id:
        return Response(status_code=204)  # claimed a moment ago, not started yet: nothing to follow
    if interaction is None:
        followed = await parley.coordinator.follow(session.ui_session_id)
        if followed is None:
            return Response(status_code=204)
        interaction, feed = followed
    plain = request.headers.get("accept", "").split(";")[0].strip().lower() == "text/plain"
    offset = query_int(request, "offset", 0, minimum=0, maximum=2**62)
    after = after_seq(request.headers.get("last-event-id"), interaction.id)
    if (counts := request.app.state.metrics) is not None:
        counts.rejoins.inc()
    return Follow(interaction, plain=plain, after=after, offset=offset, feed=feed)


async def _attachments(parley: Parley, session_id: str, file_ids: list[str]) -> list[Attachment]:
    attachments = []
    for file_id in file_ids:
        info = await parley.store.get_file(session_id, file_id)
        if info is None:
            raise FileNotFound(file_id)
        text = await parley.blobs.read_text(info.id) if is_text(info.mime_type, info.filename) else None
        attachments.append(Attachment(info.filename, info.mime_type, info.size, text))
    return attachments


async def cancel(request: Request) -> Response:
    parley, owner = await _parley(request)
    form = await read_form(bounded(request, OPTIONS_BODY_BYTES, parley.settings.body_timeout_seconds))
    session_id = required_text(form, "ui_session_id")
    interaction_id = optional_text(form, "interaction_id")

    async def check() -> Session:
        # The session must exist and be the owner's (another owner's is a 404). Run only when no interaction
        # running for this owner shows it: the owner rides on the cancel bus, so a cancel that stops a reply in
        # another process does not wait for this read first.
        return await _session(parley, session_id, owner)

    try:
        # A silent owner (dead, or between two subscriptions) is waited out: the answer stays true to history.
        outcome = await parley.interactions.cancel(
            session_id, interaction_id, owner=owner, wait_out_silence=True, check=check
        )
    except CancelFailed:
        if (counts := request.app.state.metrics) is not None:
            counts.cancel_requests.labels("failed").inc()
        raise
    if (counts := request.app.state.metrics) is not None:
        counts.cancel_requests.labels(outcome).inc()
    return JSONResponse(
        {
            "status": "success",
            "message": f"Cancellation signal sent for session: {session_id}",
            "cancelled": outcome != "not_running",
        }
    )


# files


async def upload_file(request: Request) -> Response:
    parley, owner = await _parley(request)
    limit = parley.settings.max_upload_bytes
    too_large = PayloadTooLarge(f"The file is larger than the limit of {limit} bytes.")
    body = bounded(request, limit + FORM_MARGIN_BYTES, parley.settings.body_timeout_seconds)
    file_id = new_id("file_")
    async with parley.blobs.writer(file_id, limit) as writer:
        try:
            upload = await receive_upload(body, writer)
        except FileTooLarge:
            raise too_large from None
        session_id = upload.fields.get("ui_session_id", "").strip()
        if not session_id:
            raise BadRequest("The field 'ui_session_id' is required and must not be empty.")
        await _session(parley, session_id, owner)
        blob = await writer.commit()
    filename = safe_filename(upload.filename or "")
    info = FileInfo(
        file_id, session_id, filename, mime_type(upload.declared_type, filename), blob.size, blob.sha256, utcnow()
    )
    try:
        await parley.store.add_file(info)  # SessionNotFound if the session was deleted since it was looked up
    except BaseException:
        with anyio.CancelScope(shield=True):
            await parley.blobs.delete(file_id)
        raise
    return JSONResponse(info.to_json(), status_code=201)


async def _file(parley: Parley, request: Request, owner: str) -> FileInfo:
    session = await _session(parley, request.path_params["session_id"], owner)
    file_id = request.path_params["file_id"]
    info = await parley.store.get_file(session.ui_session_id, file_id)
    if info is None:
        raise FileNotFound(file_id)
    return info


async def list_files(request: Request) -> Response:
    parley, owner = await _parley(request)
    session = await _session(parley, request.path_params["session_id"], owner)
    files = await parley.store.list_files(session.ui_session_id)
    return JSONResponse({"files": [info.to_json() for info in files]})


async def get_file(request: Request) -> Response:
    parley, owner = await _parley(request)
    return JSONResponse((await _file(parley, request, owner)).to_json())


async def get_file_content(request: Request) -> Response:
    parley, owner = await _parley(request)
    info = await _file(parley, request, owner)
    content = await parley.blobs.content(info.id)
    headers = {"content-disposition": content_disposition(info.filename), "x-content-type-options": "nosniff"}
    if isinstance(content, Path):
        return FileResponse(content, media_type=info.mime_type, headers=headers)
    headers["content-length"] = str(info.size)
    return StreamingResponse(content, media_type=info.mime_type, headers=headers)


async def delete_file(request: Request) -> Response:
    parley, owner = await _parley(request)
    info = await _file(parley, request, owner)
    await parley.store.delete_file(info.session_id, info.id)
    await parley.blobs.delete(info.id)
    return JSONResponse({"status": "success", "message": f"File {info.filename} deleted"})


# the rest


async def list_agents(request: Request) -> Response:
    parley, _ = await _parley(request)
    agents = [
        {"name": a.name, "description": a.description, "tools": [t.describe() for t in await tools_of(a)]}
        for a in parley.agents
    ]
    return JSONResponse({"agents": agents})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await readiness(request.app.state.parley)
    down = [name for name, state in checks.items() if state != "ok"]
    if not down:
        return JSONResponse({"status": "ok", "checks": checks})
    message = "Not ready: " + "; ".join(f"{name} is down ({checks[name]})" for name in down)
    return JSONResponse({"status": "error", "message": message, "checks": checks}, status_code=503)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def prometheus_metrics(request: Request) -> Response:
    if not request.app.state.auth.is_operator(request.scope):
        # Its counts cover every owner: an owner's key is not enough (see Auth.is_operator).
        raise Unauthorized(
            "GET /metrics is for operators: send PARLEY_METRICS_TOKEN as 'Authorization: Bearer <token>'.",
            bearer=True,
        )
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, headers={"content-type": content_type})


class _PlainEndpoint:
    """A route endpoint run as a plain ASGI app: Starlette wraps a function endpoint's ``send`` in one more
    layer, a cost paid on every token of a stream. Errors still reach the app's exception handlers."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response | ChatResponse | Follow]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


routes = [
    # The router tries routes in order: the hot path (a chat, and its cancel) comes first.
    Route("/api/v1/chat", _PlainEndpoint(chat), methods=["POST"]),
    Route("/api/v1/cancel", cancel, methods=["POST"]),
    Route("/api/v1/chat/{session_id}/stream", _PlainEndpoint(rejoin), methods=["GET"]),
    Route("/api/v1/sessions", create_session, methods=["POST"]),
    Route("/api/v1/sessions", list_sessions, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/api/v1/sessions/{session_id}/messages", list_messages, methods=["GET"]),
    Route("/api/v1/files", upload_file, methods=["POST"]),
    Route("/api/v1/files/{session_id}", list_files, methods=["GET"]),
    Route("/api/v1/files/{session_id}/{file_id}", get_file, methods=["GET"]),
    Route("/api/v1/files/{session_id}/{file_id}", delete_file, methods=["DELETE"]),
    Route("/api/v1/files/{session_id}/{file_id}/content", get_file_content, methods=["GET"]),
    Route("/api/v1/agents", list_agents, methods=["GET"]),
    Route("/api/v1/openapi.json", openapi, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
_metrics_routes = (Route("/metrics", prometheus_metrics, methods=["GET"]),)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    agents: Agents | None = None,
    observers: Sequence[TurnObserver] = (),
    auth: Auth | None = None,
    ui: bool = True,
    debug: bool = False,
    owns_process: bool = False,
    metrics_registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build a parley app: ``settings`` (the defaults when left out; ``Settings.from_env()`` reads PARLEY_*).
    Building it changes nothing outside the app: logging, metrics and the process are the host's.

    ``observers`` are told about every turn (see :class:`sessions.turns.TurnObserver`): metrics, logs.
    ``ui=False`` leaves out the chat page (``GET /`` and ``/ui/``), for hosts that serve their own.
    ``metrics_registry``: the Prometheus registry to keep parley's metrics in (a new one of the app's own when
    left out), for a host that serves its own ``/metrics``.
    ``debug=True`` is Starlette's: a bug is answered with its traceback (never in production).
    ``owns_process=True`` (``uvicorn app:app``) lets its lifespan tune the process's garbage collector for many
    long streams (see :mod:`parley.gc_tuning`); a host app that embeds parley leaves the collector to itself.
    """
    settings = settings or Settings()
    auth = auth or Auth(keys_from(settings.api_keys, settings.api_keys_file), settings.metrics_token)
    ops: list[TurnObserver] = [logs.InteractionLog()]
    counts = metrics.Metrics(metrics_registry) if settings.metrics else None
    if counts is not None:
        ops.append(metrics.InteractionMetrics(counts))
    parley = build(settings, store, agents, [*ops, *observers])
    if counts is not None:
        for part in (parley.store, parley.coordinator, parley.interactions.slots):
            if hasattr(part, "on_error"):
                part.on_error = counts.store_failed
            if hasattr(part, "on_duration"):
                part.on_duration = counts.store_took

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if owns_process:
            gc_tuning.tune_for_streams()
        auth.warn_if_open()
        try:
            await parley.ready()
        except StoreUnavailable as exc:
            # Not ready until the store answers (see /readyz): the first request that finds it back opens it.
            logger.error("parley: starting not ready: %s", exc.message)
        except EventLoopUnsupported as exc:
            if not owns_process:
                raise
            # The server would wrap the reason in a page of tracebacks (hypercorn's, and then exit 0): say it in
            # one line and stop the process, as a bad setting does.
            print(f"parley: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        try:
            async with anyio.create_task_group() as tg:
                # The agents' connections (MCP servers): open before the first request, or the start is refused.
                try:
                    await tg.start(parley.agents.run)
                except* SettingsError as refused:
                    logger.error("parley: %s", _first(refused))  # (the one line to read above the traceback)
                    raise
                tg.start_soon(parley.run_background)
                # Partial uploads of a killed process: untouched for twice the time a body may stall.
                tg.start_soon(parley.blobs.sweep_partials, 2 * parley.settings.body_timeout_seconds)
                yield
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await parley.close()
            if counts is not None:
                counts.process_exiting()

    # Every response gets its request id and is counted, a CORS preflight's too; a bug is logged there, once.
    middleware = [Middleware(Telemetry, metrics=counts)]
    if settings.cors_origins:
        # A browser client on another origin may call the API and read the interaction id of a reply.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["authorization", "x-api-key", "content-type", "last-event-id"],
                expose_headers=["x-interaction-id", "x-request-id"],
            )
        )
    app = Starlette(
        debug=debug,
        routes=[*routes, *(_metrics_routes if settings.metrics else ()), *(page.routes if ui else ())],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.parley = parley
    app.state.auth = auth
    app.state.metrics = counts
    app.state.openapi = document(metrics=settings.metrics, keys=auth.uses_keys, ui=ui)
    return app


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def serve_from_environment() -> Starlette:
    """The app ``uvicorn app:app`` serves: settings from the environment, and the process is parley's (its log
    format, its metrics shared across ``--workers``, its garbage collector)."""
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format)
        if settings.metrics:
            metrics.share_across_workers()
        return create_app(settings, owns_process=True)
    except SettingsError as exc:
        # A configuration mistake is the operator's to fix: say which variable, in one line, no traceback.
        print(f"parley: {exc}", file=sys.stderr, flush=True)
        # 3 is uvicorn's STARTUP_FAILURE: under --workers its supervisor stops instead of restarting the
        # worker forever (every worker would fail the same way).
        raise SystemExit(3) from None
