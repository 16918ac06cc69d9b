"""The OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Written by hand, next to the routes it describes: ``tests/test_openapi.py`` fails when a route is missing
from it or it names one that does not exist, and Schemathesis holds every response to it.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_ERROR: Schema = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


_TEXT: Schema = {"type": "string"}
_REQUIRED_TEXT: Schema = {"type": "string", "pattern": "\\S", "description": "Not empty, not only whitespace"}
_BYTES: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
_TIME: Schema = {"type": "string", "description": "UTC, ISO 8601 with microseconds, e.g. 2026-11-26T14:00:00.000000Z"}
_ERRORS_WHEN = {
    400: "Bad request: a field missing, empty or malformed; a body that cannot be parsed",
    404: "Not found: an unknown session or file",
    408: "The body stopped arriving for PARLEY_BODY_TIMEOUT_SECONDS",
    409: "Conflict",
    413: "Payload too large",
    500: "Internal server error",
    502: "The model server failed before the first token",
    503: "Unavailable: Redis is configured and unreachable (or the session's agent is not configured)",
}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "headers": _REQUEST_ID, "content": {"application/json": {"schema": schema}}}


_REQUEST_ID = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[int, Schema],
    errors: tuple[int, ...],
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    links: dict[str, Schema] | None = None,
) -> Schema:
    answers = {str(status): response for status, response in responses.items()}
    for status in errors:
        answers[str(status)] = _json(_ERROR, _ERRORS_WHEN[status])
    if links:
        first = str(min(responses))
        answers[first] = {**answers[first], "links": links}
    operation: Schema = {"operationId": operation_id, "summary": summary, "responses": answers}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    return operation


def _path(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _TEXT}


_SESSION_PARAM = _path("session_id", "The session's ui_session_id")
_FILE_PARAM = _path("file_id", "The file's id")


def _form(schema: Schema, *, urlencoded: bool = True) -> Schema:
    content = {"multipart/form-data": {"schema": schema}}
    if urlencoded:
        content["application/x-www-form-urlencoded"] = {"schema": schema}
    return {"required": True, "content": content}


def _link(operation_id: str, *, path: bool = False, body: Schema | None = None) -> Schema:
    link: Schema = {"operationId": operation_id}
    if path:
        link["parameters"] = {"session_id": "$response.body#/ui_session_id"}
    if body:
        link["requestBody"] = body
    return link


_STREAM: Schema = {
    "description": "The reply, streamed (chunked) as it is produced: plain text, or with Accept: text/event-stream "
    "(or the AI SDK's body) the AI SDK's UI message stream protocol v1, one JSON part per frame",
    "headers": {
        **_REQUEST_ID,
        "X-Interaction-Id": {"description": "The interaction's id (for POST /api/v1/cancel)", "schema": _TEXT},
    },
    "content": {"text/plain": {"schema": _TEXT}, "text/event-stream": {"schema": _TEXT}},
}
_ON_DISCONNECT: Schema = {
    "enum": ["cancel", "continue"],
    "description": "What the client going away does to the reply (the server's PARLEY_ON_DISCONNECT if absent)",
}
_ON_DISCONNECT_QUERY: Schema = {"name": "on_disconnect", "in": "query", "schema": _ON_DISCONNECT}

_SESSION_LINKS = {
    "GetSession": _link("getSession", path=True),
    "ListMessages": _link("listMessages", path=True),
    "DeleteSession": _link("deleteSession", path=True),
    "ListFiles": _link("listFiles", path=True),
    "Rejoin": _link("rejoinChat", path=True),
    "Chat": _link("chat", body={"ui_session_id": "$response.body#/ui_session_id", "message": "hello there"}),
    "Cancel": _link("cancel", body={"ui_session_id": "$response.body#/ui_session_id"}),
}

_SCHEMAS: dict[str, Schema] = {
    "Error": _object({"status": {"const": "error"}, "message": _TEXT}),
    "Success": _object({"status": {"const": "success"}, "message": _TEXT}),
    "Session": _object({"ui_session_id": _TEXT, "agent": _TEXT, "created_at": _TIME}),
    "SessionState": _object(
        {"ui_session_id": _TEXT, "agent": _TEXT, "created_at": _TIME, "status": {"enum": ["idle", "streaming"]}}
    ),
    "Message": _object(
        {
            "id": _TEXT,
            "role": {"enum": ["user", "assistant"]},
            "content": {"type": "string", "description": "Exactly the text that was streamed"},
            "file_ids": {"type": "array", "items": _TEXT},
            "status": {"enum": ["complete", "cancelled", "disconnected", "error", "interrupted", "streaming"]},
            "interaction_id": _TEXT,
            "created_at": _TIME,
        }
    ),
    "File": _object(
        {
            "id": _TEXT,
            "filename": _TEXT,
            "mime_type": _TEXT,
            "size": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "created_at": _TIME,
        }
    ),
    "CancelReply": _object(
        {
            "status": {"const": "success"},
            "message": _TEXT,
            "cancelled": {"type": "boolean", "description": "Whether an interaction in progress was stopped"},
        }
    ),
    "Agent": _object(
        {
            "name": _TEXT,
            "description": _TEXT,
            "tools": {"type": "array", "items": _ref("Tool"), "description": "The tools it offers its model"},
        }
    ),
    "Tool": _object({"name": _TEXT, "description": _TEXT}),
    "NewSession": _object(
        {},
        {
            "agent": {"type": "string", "description": "GET /api/v1/agents lists them; the server's default if absent"},
            "ui_session_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
        },
    ),
    "ChatForm": _object(
        {"ui_session_id": _REQUIRED_TEXT, "message": _REQUIRED_TEXT},
        {
            "file_ids": {"type": "string", "description": 'A JSON array of file ids, e.g. ["file_123"]'},
            "on_disconnect": _ON_DISCONNECT,
        },
    ),
    "ChatJson": _object(
        {"ui_session_id": _REQUIRED_TEXT, "message": _REQUIRED_TEXT},
        {
            "file_ids": {"oneOf": [{"type": "array", "items": _TEXT}, {"type": "string"}]},
            "on_disconnect": _ON_DISCONNECT,
        },
    ),
    "AiSdkChat": {
        "type": "object",
        "description": "The body of the AI SDK's DefaultChatTransport: parley answers the last user message's text",
        "properties": {
            "id": {**_REQUIRED_TEXT, "description": "The chat's id: parley's ui_session_id"},
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {"enum": ["system", "user", "assistant"]},
                        "parts": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"type": _TEXT, "text": _TEXT}},
                        },
                    },
                },
                "description": "The conversation: the last message whose role is user must have a text part",
                "contains": {
                    "type": "object",
                    "required": ["role", "parts"],
                    "properties": {
                        "role": {"const": "user"},
                        "parts": {
                            "type": "array",
                            "contains": {
                                "type": "object",
                                "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": _REQUIRED_TEXT},
                            },
                        },
                    },
                },
            },
            "trigger": {"enum": ["submit-message", "regenerate-message"]},
            "file_ids": {"oneOf": [{"type": "array", "items": _TEXT}, {"type": "string"}]},
            "on_disconnect": _ON_DISCONNECT,
        },
        "required": ["id", "messages"],
    },
    "CancelForm": _object(
        {"ui_session_id": _REQUIRED_TEXT},
        {"interaction_id": {"type": "string", "description": "Cancel only this interaction (X-Interaction-Id)"}},
    ),
    "UploadForm": _object({"ui_session_id": _REQUIRED_TEXT, "file": _BYTES}),
    "Readiness": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error"]},
            "message": _TEXT,
            "checks": {"type": "object", "additionalProperties": _TEXT},
        },
        "required": ["status", "checks"],
        "additionalProperties": False,
    },
}


def _list_of(key: str, item: str) -> Schema:
    return _object({key: {"type": "array", "items": _ref(item)}})


_PATHS: dict[str, dict[str, Schema]] = {
    "/api/v1/chat": {
        "post": _operation(
            "chat",
            "Send a message; the reply streams back as plain text (one chunk per token) or as the AI SDK's SSE",
            {200: _STREAM},
            (400, 404, 408, 409, 413, 500, 502, 503),
            parameters=[_ON_DISCONNECT_QUERY],
            body={
                "required": True,
                "content": {
                    **_form(_ref("ChatForm"))["content"],
                    "application/json": {"schema": {"oneOf": [_ref("ChatJson"), _ref("AiSdkChat")]}},
                },
            },
        )
    },
    "/api/v1/chat/{session_id}/stream": {
        "get": _operation(
            "rejoinChat",
            "Follow the session's reply in progress: from its start, or after Last-Event-ID, or from a text offset",
            {
                200: _STREAM,
                204: {"description": "No reply of this session is in progress", "headers": _REQUEST_ID},
            },
            (404, 500, 503),
            parameters=[
                _SESSION_PARAM,
                {
                    "name": "offset",
                    "in": "query",
                    "description": "With Accept: text/plain, the text from this character on",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 2**62},
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "description": "SSE: only the frames after this one (<interaction_id>:<seq>)",
                    "schema": _TEXT,
                },
            ],
        )
    },
    "/api/v1/cancel": {
        "post": _operation(
            "cancel",
            "Stop the session's interaction in progress, wherever it runs",
            {200: _json(_ref("CancelReply"), "The cancel was delivered (cancelled says if anything was stopped)")},
            (400, 404, 408, 413, 500, 503),
            body=_form(_ref("CancelForm")),
        )
    },
    "/api/v1/sessions": {
        "post": _operation(
            "createSession",
            "Create a session",
            {201: _json(_ref("Session"), "The session")},
            (400, 408, 409, 413, 503),
            body={
                "required": False,
                "content": {
                    "application/json": {"schema": _ref("NewSession")},
                    "multipart/form-data": {"schema": _ref("NewSession")},
                    "application/x-www-form-urlencoded": {"schema": _ref("NewSession")},
                },
            },
            links={
                **_SESSION_LINKS,
                "Upload": _link("uploadFile", body={"ui_session_id": "$response.body#/ui_session_id"}),
            },
        ),
        "get": _operation(
            "listSessions",
            "List sessions, newest first",
            {200: _json(_list_of("sessions", "Session"), "A page of sessions")},
            (400, 503),
            parameters=[
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 2**31}},
            ],
        ),
    },
    "/api/v1/sessions/{session_id}": {
        "get": _operation(
            "getSession",
            "A session, and whether it is streaming now",
            {200: _json(_ref("SessionState"), "The session")},
            (404, 503),
            parameters=[_SESSION_PARAM],
        ),
        "delete": _operation(
            "deleteSession",
            "Cancel the session's reply in progress, then delete it with its history and files",
            {200: _json(_ref("Success"), "Deleted")},
            (404, 503),
            parameters=[_SESSION_PARAM],
        ),
    },
    "/api/v1/sessions/{session_id}/messages": {
        "get": _operation(
            "listMessages",
            "The session's history, oldest first",
            {200: _json(_list_of("messages", "Message"), "The history")},
            (404, 503),
            parameters=[_SESSION_PARAM],
        )
    },
    "/api/v1/files": {
        "post": _operation(
            "uploadFile",
            "Upload a file to a session (multipart, the bytes in the part named file)",
            {201: _json(_ref("File"), "The file's metadata")},
            (400, 404, 408, 413, 503),
            body=_form(_ref("UploadForm"), urlencoded=False),
            links={
                name: {
                    "operationId": operation_id,
                    "parameters": {"session_id": "$request.body#/ui_session_id", "file_id": "$response.body#/id"},
                }
                for name, operation_id in (
                    ("GetFile", "getFile"),
                    ("GetFileContent", "getFileContent"),
                    ("DeleteFile", "deleteFile"),
                )
            },
        )
    },
    "/api/v1/files/{session_id}": {
        "get": _operation(
            "listFiles",
            "The session's files",
            {200: _json(_list_of("files", "File"), "The files' metadata")},
            (404, 503),
            parameters=[_SESSION_PARAM],
        )
    },
    "/api/v1/files/{session_id}/{file_id}": {
        "get": _operation(
            "getFile",
            "A file's metadata",
            {200: _json(_ref("File"), "The file's metadata")},
            (404, 503),
            parameters=[_SESSION_PARAM, _FILE_PARAM],
        ),
        "delete": _operation(
            "deleteFile",
            "Delete a file",
            {200: _json(_ref("Success"), "Deleted")},
            (404, 503),
            parameters=[_SESSION_PARAM, _FILE_PARAM],
        ),
    },
    "/api/v1/files/{session_id}/{file_id}/content": {
        "get": _operation(
            "getFileContent",
            "A file's bytes, as an attachment, with the type it was uploaded with",
            {
                200: {
                    "description": "The bytes",
                    "headers": _REQUEST_ID,
                    "content": {"*/*": {"schema": _BYTES}},
                }
            },
            (404, 503),
            parameters=[_SESSION_PARAM, _FILE_PARAM],
        )
    },
    "/api/v1/agents": {
        "get": _operation(
            "listAgents", "The agents this server offers", {200: _json(_list_of("agents", "Agent"), "The agents")}, ()
        )
    },
    "/api/v1/openapi.json": {
        "get": _operation("openapi", "This document", {200: _json({"type": "object"}, "The OpenAPI 3.1 document")}, ())
    },
    "/healthz": {
        "get": _operation(
            "healthz",
            "Liveness: the process answers",
            {200: _json(_object({"status": {"const": "ok"}}), "Alive")},
            (),
        )
    },
    "/readyz": {
        "get": _operation(
            "readyz",
            "Readiness: the store (and Redis, when configured) answered within a second",
            {
                200: _json(_ref("Readiness"), "Ready"),
                503: _json(_ref("Readiness"), "Not ready: checks says what is down"),
            },
            (),
        )
    },
}


def _file(operation_id: str, summary: str, media_type: str) -> dict[str, Schema]:
    content = {media_type: {"schema": _TEXT}}
    return {"get": _operation(operation_id, summary, {200: {"description": summary, "content": content}}, ())}


_METRICS = _file("metrics", "Prometheus metrics, in the text exposition format", "text/plain")
_PAGE = {
    "/": _file("page", "The chat page", "text/html"),
    "/ui/app.js": _file("pageScript", "The chat page's script", "text/javascript"),
    "/ui/style.css": _file("pageStyle", "The chat page's style sheet", "text/css"),
}
# Answered without a key, even when keys are configured: probes, this document, the page (it asks for the key).
_OPEN = {"/healthz", "/readyz", "/api/v1/openapi.json", *_PAGE}

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"},
}
_UNAUTHORIZED: Schema = {
    "description": "No API key, or one that names no owner (PARLEY_API_KEYS)",
    "headers": {**_REQUEST_ID, "WWW-Authenticate": {"schema": {"const": "Bearer"}}},
    "content": {"application/json": {"schema": _ERROR}},
}


def document(*, metrics: bool, keys: bool, ui: bool) -> Schema:
    """The OpenAPI document of an app: with ``/metrics`` when metrics are on, the page when it is served, and
    the security schemes (and every 401) when API keys are configured."""
    paths = dict(_PATHS)
    if metrics:
        paths["/metrics"] = _METRICS
    if ui:
        paths.update(_PAGE)
    components: Schema = {
        "schemas": _SCHEMAS,
        "headers": {
            "RequestId": {
                "description": "The request's id: the client's X-Request-Id, or a new one; in every log line",
                "schema": _TEXT,
            }
        },
    }
    security: list[Schema] = []
    if keys:
        components["securitySchemes"] = _SECURITY_SCHEMES
        security = [{"bearer": []}, {"apiKey": []}]
        paths = {
            path: {
                method: {**operation, "security": []}
                if path in _OPEN
                else {**operation, "responses": {**operation["responses"], "401": _UNAUTHORIZED}}
                for method, operation in operations.items()
            }
            for path, operations in paths.items()
        }
    document: Schema = {
        "openapi": "3.1.0",
        "info": {
            "title": "parley",
            "version": "0.1.0",
            "description": "Chat with an AI agent over HTTP: streamed replies, cancellable mid-stream.",
        },
        "paths": paths,
        "components": components,
    }
    if security:
        document["security"] = security
    return document
