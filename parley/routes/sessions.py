"""Sessions: create, list, read (with whether a reply is streaming), delete (with the reply in progress, its
history and files), and a session's history."""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from parley.errors import BadRequest
from parley.file_parts import history_parts
from parley.forms import OPTIONS_BODY_BYTES, SESSION_ID, bounded, query_int, read_json_or_form, session_title
from parley.openapi import (
    SESSION_LINKS,
    SESSION_PARAMETER,
    documented,
    json_response,
    link,
    list_of,
    query_bounds,
    ref,
)
from parley.routes import authenticated, owned_session
from parley.sessions.errors import CancelFailed, SessionNotFound
from parley.sessions.store import Session, new_id, utcnow

logger = logging.getLogger("parley")


@documented(
    "createSession",
    "Create a session",
    {201: json_response(ref("Session"), "The session")},
    (400, 408, 409, 413, 503),
    body={
        "required": False,
        "content": {
            "application/json": {"schema": ref("NewSession")},
            "multipart/form-data": {"schema": ref("NewSession")},
            "application/x-www-form-urlencoded": {"schema": ref("NewSession")},
        },
    },
    links={**SESSION_LINKS, "Upload": link("uploadFile", body={"ui_session_id": "$response.body#/ui_session_id"})},
)
async def create_session(request: Request) -> Response:
    parley, owner = await authenticated(request)
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
    session = Session(session_id, agent, utcnow(), owner, session_title(options.get("title")))
    await parley.store.create_session(session)
    return JSONResponse(session.to_json(), status_code=201)


_LIMIT, _OFFSET = (1, 1000), (0, 2**31)


@documented(
    "listSessions",
    "List sessions, newest first",
    {200: json_response(list_of("sessions", "Session"), "A page of sessions")},
    (400, 503),
    parameters=[query_bounds("limit", *_LIMIT), query_bounds("offset", *_OFFSET)],
)
async def list_sessions(request: Request) -> Response:
    parley, owner = await authenticated(request)
    limit = query_int(request, "limit", 50, minimum=_LIMIT[0], maximum=_LIMIT[1])
    offset = query_int(request, "offset", 0, minimum=_OFFSET[0], maximum=_OFFSET[1])
    sessions = await parley.store.list_sessions(owner, limit, offset)
    return JSONResponse({"sessions": [session.to_json() for session in sessions]})


@documented(
    "getSession",
    "A session, and whether it is streaming now",
    {200: json_response(ref("SessionState"), "The session")},
    (404, 503),
    parameters=[SESSION_PARAMETER],
)
async def get_session(request: Request) -> Response:
    parley, owner = await authenticated(request)
    session = await owned_session(parley, request.path_params["session_id"], owner)
    await parley.interrupt_orphans(session.ui_session_id)
    streaming = await parley.interactions.is_streaming(session.ui_session_id, owner)
    # The messages that wait for it (if_busy enqueue), by interaction id: a cancel with one takes it out of the line.
    line = await parley.interactions.line(session.ui_session_id)
    state = {"status": "streaming" if streaming else "idle", "queued": len(line), "queued_interactions": line}
    return JSONResponse({**session.to_json(), **state})


@documented(
    "updateSession",
    "Rename a session",
    {200: json_response(ref("Session"), "The session")},
    (400, 404, 408, 413, 503),
    parameters=[SESSION_PARAMETER],
    body={
        "required": True,
        "content": {
            "application/json": {"schema": ref("SessionUpdate")},
            "multipart/form-data": {"schema": ref("SessionUpdate")},
            "application/x-www-form-urlencoded": {"schema": ref("SessionUpdate")},
        },
    },
)
async def update_session(request: Request) -> Response:
    parley, owner = await authenticated(request)
    options = await read_json_or_form(bounded(request, OPTIONS_BODY_BYTES, parley.settings.body_timeout_seconds))
    if "title" not in options:
        raise BadRequest("Send the field to change: title (1 to 200 characters, or null for the first message's).")
    session_id = request.path_params["session_id"]
    if not await parley.store.set_title(session_id, owner, session_title(options["title"])):
        raise SessionNotFound(session_id)
    return JSONResponse((await owned_session(parley, session_id, owner)).to_json())


@documented(
    "deleteSession",
    "Cancel the session's reply in progress, then delete it with its history and files",
    {200: json_response(ref("Success"), "Deleted")},
    (404, 503),
    parameters=[SESSION_PARAMETER],
)
async def delete_session(request: Request) -> Response:
    parley, owner = await authenticated(request)
    session = await owned_session(parley, request.path_params["session_id"], owner)
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


@documented(
    "listMessages",
    "The session's history, oldest first",
    {200: json_response(list_of("messages", "Message"), "The history")},
    (404, 503),
    parameters=[SESSION_PARAMETER],
)
async def list_messages(request: Request) -> Response:
    parley, owner = await authenticated(request)
    session = await owned_session(parley, request.path_params["session_id"], owner)
    await parley.interrupt_orphans(session.ui_session_id)
    messages = await parley.store.list_messages(session.ui_session_id)
    body = [message.to_json() for message in messages]
    if any(message.file_ids for message in messages):
        # A user message's files are parts of it too, before its text, as the AI SDK's sendMessage puts them.
        files = {info.id: info for info in await parley.store.list_files(session.ui_session_id)}
        root_path = request.scope.get("root_path", "")
        for message, shown in zip(messages, body, strict=True):
            if message.file_ids:
                shown["parts"] = [*history_parts(message.file_ids, files, root_path), *shown["parts"]]
    return JSONResponse({"messages": body})
