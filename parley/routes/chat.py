"""The chat: send a message and read the reply as it streams (plain text or the AI SDK's SSE), cancel it from
another request, or rejoin it from its start or from where a client left off."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from parley.agents import Attachment
from parley.forms import (
    OPTIONS_BODY_BYTES,
    bounded,
    chat_body_limit,
    header,
    optional_text,
    query_int,
    read_chat,
    read_form,
    required_text,
)
from parley.openapi import (
    IF_BUSY_QUERY,
    ON_DISCONNECT_QUERY,
    REQUEST_ID,
    SESSION_PARAMETER,
    STREAM,
    TEXT,
    documented,
    form,
    json_response,
    query_bounds,
    ref,
)
from parley.rejoin import Follow, after_seq
from parley.routes import authenticated, owned_session
from parley.routes.files import keep_file_parts
from parley.service import Parley
from parley.sessions.errors import CancelFailed, FileNotFound
from parley.sessions.files import is_text
from parley.sessions.interactions import IfBusy
from parley.sessions.store import Session
from parley.sessions.turns import TurnRequest
from parley.streaming import ChatResponse, OnDisconnect, PlainText
from parley.ui_messages import ServerSentEvents

logger = logging.getLogger("parley")


@documented(
    "chat",
    "Send a message; the reply streams back as plain text (one chunk per token) or as the AI SDK's SSE",
    {200: STREAM},
    (400, 404, 408, 409, 413, 429, 500, 502, 503),
    parameters=[ON_DISCONNECT_QUERY, IF_BUSY_QUERY],
    body={
        "required": True,
        "content": {
            **form(ref("ChatForm"))["content"],
            "application/json": {"schema": {"oneOf": [ref("ChatJson"), ref("AiSdkChat")]}},
        },
    },
)
async def chat(request: Request) -> Response | ChatResponse | _KeptFiles:
    parley, owner = await authenticated(request)
    limit = parley.settings.max_message_bytes
    body = bounded(request, chat_body_limit(request, limit), parley.settings.body_timeout_seconds)
    chat = await read_chat(body, max_message_bytes=limit, max_file_bytes=parley.settings.max_upload_bytes)
    session_id, file_ids = chat.session_id, chat.file_ids
    kept: list[str] = []  # files that the chat's file parts brought
    attachments: list[Attachment] = []
    if file_ids or chat.files:  # (without files, claiming the session for the turn finds out whether it is the owner's)
        await owned_session(parley, session_id, owner)
        async with _dropped_unless_named(parley, session_id, kept):
            if chat.files:
                named = await keep_file_parts(parley, session_id, chat.files, kept)
                file_ids = list(dict.fromkeys([*file_ids, *named]))
            attachments = await _attachments(parley, session_id, file_ids)
    # (A turn left streaming by a process that died is recorded interrupted when the session is claimed.)
    if_busy: IfBusy = chat.if_busy or parley.settings.if_busy  # type: ignore[assignment]  # (both checked)
    turn = TurnRequest(
        session_id,
        chat.message,
        file_ids,
        attachments,
        owner,
        chat.replace,
        chat.missing_ok,
        chat.keep,
        chat.client_id,
        if_busy,
    )
    on_disconnect: OnDisconnect = (
        "continue" if (chat.on_disconnect or parley.settings.on_disconnect) == "continue" else "cancel"
    )
    stall = parley.settings.body_timeout_seconds  # (a client may stall reading a reply as long as sending a body)
    if _wants_sse(request, chat.ai_sdk):
        keepalive = parley.settings.sse_keepalive_seconds
        response = ChatResponse(parley.runner, turn, ServerSentEvents, on_disconnect, keepalive, stall)
    else:
        response = ChatResponse(parley.runner, turn, PlainText, on_disconnect, stall_seconds=stall)
    return _KeptFiles(response, parley, session_id, kept) if kept else response


def _wants_sse(request: Request, ai_sdk: bool) -> bool:
    """SSE when the client asks for it, or sends the AI SDK's body without asking for plain text alone."""
    accept = header(request, b"accept").lower()
    if "text/event-stream" in accept:
        return True
    return ai_sdk and [part.split(";")[0].strip() for part in accept.split(",")] != ["text/plain"]


_OFFSET = (0, 2**62)


@documented(
    "rejoinChat",
    "Follow the session's reply in progress: from its start, or after Last-Event-ID, or from a text offset",
    {200: STREAM, 204: {"description": "No reply of this session is in progress", "headers": REQUEST_ID}},
    (404, 500, 503),
    parameters=[
        SESSION_PARAMETER,
        query_bounds("offset", *_OFFSET, "With Accept: text/plain, the text from this character on"),
        {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "SSE: only the frames after this one (<interaction_id>:<seq>)",
            "schema": TEXT,
        },
    ],
)
async def rejoin(request: Request) -> Response | Follow:
    parley, owner = await authenticated(request)
    session = await owned_session(parley, request.path_params["session_id"], owner)
    interaction, feed = parley.interactions.get(session.ui_session_id), None
    if interaction is not None and not interaction.message_id:
        return Response(status_code=204)  # claimed a moment ago, not started yet: nothing to follow
    if interaction is None:
        followed = await parley.coordinator.follow(session.ui_session_id)
        if followed is None:
            return Response(status_code=204)
        interaction, feed = followed
    plain = request.headers.get("accept", "").split(";")[0].strip().lower() == "text/plain"
    offset = query_int(request, "offset", 0, minimum=_OFFSET[0], maximum=_OFFSET[1])
    after = after_seq(request.headers.get("last-event-id"), interaction.id)
    if (counts := request.app.state.metrics) is not None:
        counts.rejoins.inc()
    return Follow(interaction, plain=plain, after=after, offset=offset, feed=feed)


class _KeptFiles:
    """The response to a chat whose file parts became new files of the session: if its turn did not start (busy,
    too many streams, ...), no message names them, and they go again: a refused chat records nothing."""

    def __init__(self, response: ChatResponse, parley: Parley, session_id: str, file_ids: list[str]) -> None:
        self.response = response
        self.parley = parley
        self.session_id = session_id
        self.file_ids = file_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with _dropped_unless_named(self.parley, self.session_id, self.file_ids):
            await self.response(scope, receive, send)


@asynccontextmanager
async def _dropped_unless_named(parley: Parley, session_id: str, file_ids: list[str]) -> AsyncIterator[None]:
    """If the ``async with`` block fails, those of ``file_ids`` (as they are then) that no message names go."""
    try:
        yield
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _drop_unnamed(parley, session_id, file_ids)
        raise


async def _drop_unnamed(parley: Parley, session_id: str, file_ids: list[str]) -> None:
    """Delete those of ``file_ids`` that no message of the session names."""
    if not file_ids:
        return
    try:
        named = {file_id for message in await parley.store.list_messages(session_id) for file_id in message.file_ids}
        for file_id in file_ids:
            if file_id not in named and await parley.store.delete_file(session_id, file_id):
                await parley.blobs.delete(file_id)
    except Exception as exc:  # (the store is down: they stay with the session, as an upload's would)
        logger.warning("could not remove the files of a refused chat in session %s: %s", session_id, exc)


async def _attachments(parley: Parley, session_id: str, file_ids: list[str]) -> list[Attachment]:
    attachments = []
    for file_id in file_ids:
        info = await parley.store.get_file(session_id, file_id)
        if info is None:
            raise FileNotFound(file_id)
        text = await parley.blobs.read_text(info.id) if is_text(info.mime_type, info.filename) else None
        attachments.append(Attachment(info.filename, info.mime_type, info.size, text))
    return attachments


@documented(
    "cancel",
    "Stop the session's interaction in progress, wherever it runs",
    {200: json_response(ref("CancelReply"), "The cancel was delivered (cancelled says if anything was stopped)")},
    (400, 404, 408, 413, 500, 503),
    body=form(ref("CancelForm")),
)
async def cancel(request: Request) -> Response:
    parley, owner = await authenticated(request)
    form = await read_form(bounded(request, OPTIONS_BODY_BYTES, parley.settings.body_timeout_seconds))
    session_id = required_text(form, "ui_session_id")
    interaction_id = optional_text(form, "interaction_id")

    async def check() -> Session:
        # The session must exist and be the owner's (another owner's is a 404). Run only when no interaction
        # running for this owner shows it: the owner rides on the cancel bus, so a cancel that stops a reply in
        # another process does not wait for this read first.
        return await owned_session(parley, session_id, owner)

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
