"""The app: the route table (the endpoints are in :mod:`parley.routes`), and how an app is put together from its
settings, its store and agents, its middleware and its error table (:func:`create_app`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

import anyio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from parley import gc_tuning, logs, metrics, page
from parley.agents import Agents
from parley.auth import Auth, keys_from
from parley.errors import EXCEPTION_HANDLERS
from parley.openapi import document
from parley.routes import chat, files, operations, sessions
from parley.service import build
from parley.sessions import Store
from parley.sessions.errors import EventLoopUnsupported, StoreUnavailable
from parley.sessions.turns import TurnObserver
from parley.settings import Settings, SettingsError
from parley.telemetry import Telemetry

logger = logging.getLogger("parley")


class _PlainEndpoint:
    """A route endpoint run as a plain ASGI app: Starlette wraps a function endpoint's ``send`` in one more
    layer, a cost paid on every token of a stream. Errors still reach the app's exception handlers."""

    def __init__(self, handler: Callable[[Request], Awaitable[ASGIApp]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


routes = [
    # The router tries routes in order: the hot path (a chat, and its cancel) comes first.
    Route("/api/v1/chat", _PlainEndpoint(chat.chat), methods=["POST"]),
    Route("/api/v1/cancel", chat.cancel, methods=["POST"]),
    Route("/api/v1/chat/{session_id}/stream", _PlainEndpoint(chat.rejoin), methods=["GET"]),
    Route("/api/v1/sessions", sessions.create_session, methods=["POST"]),
    Route("/api/v1/sessions", sessions.list_sessions, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", sessions.get_session, methods=["GET"]),
    Route("/api/v1/sessions/{session_id}", sessions.update_session, methods=["PATCH"]),
    Route("/api/v1/sessions/{session_id}", sessions.delete_session, methods=["DELETE"]),
    Route("/api/v1/sessions/{session_id}/messages", sessions.list_messages, methods=["GET"]),
    Route("/api/v1/files", files.upload_file, methods=["POST"]),
    Route("/api/v1/files/{session_id}", files.list_files, methods=["GET"]),
    Route("/api/v1/files/{session_id}/{file_id}", files.get_file, methods=["GET"]),
    Route("/api/v1/files/{session_id}/{file_id}", files.delete_file, methods=["DELETE"]),
    Route("/api/v1/files/{session_id}/{file_id}/content", files.get_file_content, methods=["GET"]),
    Route("/api/v1/agents", operations.list_agents, methods=["GET"]),
    Route("/api/v1/openapi.json", operations.openapi, methods=["GET"]),
    Route("/healthz", operations.healthz, methods=["GET"]),
    Route("/readyz", operations.readyz, methods=["GET"]),
]
metrics_routes = [Route("/metrics", operations.prometheus_metrics, methods=["GET"])]


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

    async def recorded(session_id: str, file_id: str) -> bool:
        return await parley.store.get_file(session_id, file_id) is not None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if owns_process:
            gc_tuning.tune_for_streams()
        auth.warn_if_open()
        parley.in_lifespan = True  # (what runs beside the requests runs here, below: not on first use)
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
            _say_and_exit(f"parley: {exc}", 1)
        try:
            async with anyio.create_task_group() as tg:
                # The agents' connections (MCP servers): open before the first request, or the start is refused.
                try:
                    await tg.start(parley.agents.run)
                except* SettingsError as refused:
                    if owns_process:
                        # A configuration mistake, found only now: one line and exit 3, as a bad setting at
                        # start-up does (uvicorn's --workers supervisor stops rather than restart it forever).
                        _say_and_exit(f"parley: {_first(refused)}", 3)
                    logger.error("parley: %s", _first(refused))  # (the host's server prints the traceback)
                    raise
                tg.start_soon(parley.run_background)
                # Partial uploads of a killed process: untouched for twice the time a body may stall.
                # And the blobs of one killed between its upload's commit and its record.
                tg.start_soon(parley.blobs.sweep_partials, 2 * parley.settings.body_timeout_seconds, recorded)
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
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["authorization", "x-api-key", "content-type", "last-event-id"],
                expose_headers=["x-interaction-id", "x-request-id"],
            )
        )
    app = Starlette(
        debug=debug,
        routes=[*routes, *(metrics_routes if settings.metrics else ()), *(page.routes if ui else ())],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.parley = parley
    app.state.auth = auth
    app.state.metrics = counts
    app.state.openapi = document(app.routes, settings, keys=auth.uses_keys)
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
        _say(f"parley: {exc}")
        # 3 is uvicorn's STARTUP_FAILURE: under --workers its supervisor stops instead of restarting the
        # worker forever (every worker would fail the same way).
        raise SystemExit(3) from None


def _say(line: str) -> None:
    # One write of the whole line: under --workers every worker says it on the same stderr at once, and print()
    # writes the text and its newline apart, so two workers' lines could run together.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _say_and_exit(line: str, status: int) -> NoReturn:
    _say(line)
    os._exit(status)
