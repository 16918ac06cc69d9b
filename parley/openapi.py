"""The OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``, made from the app's route table.

Each endpoint's operation (its summary, responses, the errors it answers with, parameters and body) is written by
hand next to it, with :func:`documented`. What the code already holds is taken from the code: the paths and methods
(the route table), what each error status means (:mod:`parley.errors`), enums (the Literal types), limits (the
settings, the endpoints' bounds) and the version (the package's metadata). ``tests/test_openapi.py`` checks that
it names every route and nothing else, and Schemathesis holds the running app to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, TypeVar, get_args

from starlette.routing import BaseRoute, Route

from parley.errors import MEANING
from parley.forms import SESSION_ID
from parley.sessions.store import MessageStatus, Role
from parley.settings import Settings
from parley.streaming import OnDisconnect

Schema = dict[str, Any]
Handler = TypeVar("Handler", bound=Callable[..., Any])

ERROR: Schema = {"$ref": "#/components/schemas/Error"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


TEXT: Schema = {"type": "string"}
_REQUIRED_TEXT: Schema = {"type": "string", "pattern": "\\S", "description": "Not empty, not only whitespace"}
BYTES: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_TIME: Schema = {"type": "string", "description": "UTC, ISO 8601 with microseconds, e.g. 2026-11-26T14:00:00.000000Z"}
REQUEST_ID = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}


def json_response(schema: Schema, description: str) -> Schema:
    return {"description": description, "headers": REQUEST_ID, "content": {"application/json": {"schema": schema}}}


def object_of(fields: dict[str, Schema]) -> Schema:
    return _object(fields)


def list_of(key: str, item: str) -> Schema:
    return _object({key: {"type": "array", "items": ref(item)}})


def path_parameter(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": TEXT}


def query_bounds(name: str, minimum: int, maximum: int, description: str | None = None) -> Schema:
    parameter: Schema = {
        "name": name,
        "in": "query",
        "schema": {"type": "integer", "minimum": minimum, "maximum": maximum},
    }
    if description:
        parameter["description"] = description
    return parameter


SESSION_PARAMETER = path_parameter("session_id", "The session's ui_session_id")
FILE_PARAMETER = path_parameter("file_id", "The file's id")


def form(schema: Schema, *, urlencoded: bool = True) -> Schema:
    content = {"multipart/form-data": {"schema": schema}}
    if urlencoded:
        content["application/x-www-form-urlencoded"] = {"schema": schema}
    return {"required": True, "content": content}


def link(operation_id: str, *, path: bool = False, body: Schema | None = None) -> Schema:
    found: Schema = {"operationId": operation_id}
    if path:
        found["parameters"] = {"session_id": "$response.body#/ui_session_id"}
    if body:
        found["requestBody"] = body
    return found


STREAM: Schema = {
    "description": "The reply, streamed (chunked) as it is produced: plain text, or with Accept: text/event-stream "
    "(or the AI SDK's body) the AI SDK's UI message stream protocol v1, one JSON part per frame",
    "headers": {
        **REQUEST_ID,
        "X-Interaction-Id": {"description": "The interaction's id (for POST /api/v1/cancel)", "schema": TEXT},
    },
    "content": {"text/plain": {"schema": TEXT}, "text/event-stream": {"schema": TEXT}},
}
_ON_DISCONNECT: Schema = {
    "enum": list(get_args(OnDisconnect)),
    "description": "What the client going away does to the reply (the server's PARLEY_ON_DISCONNECT if absent)",
}
ON_DISCONNECT_QUERY: Schema = {"name": "on_disconnect", "in": "query", "schema": _ON_DISCONNECT}
_IF_BUSY: Schema = {
    "enum": ["reject", "interrupt", "enqueue"],
    "description": "What it does when the session has a reply in progress (the server's PARLEY_IF_BUSY if absent)",
}
IF_BUSY_QUERY: Schema = {"name": "if_busy", "in": "query", "schema": _IF_BUSY}
_REPLACE: Schema = {
    "type": "string",
    "pattern": "\\S",
    "description": "A message of the session that this one takes the place of, with everything after it: a reply "
    "(regenerate: message may be left out) or a user message (edit)",
}
_TITLE: Schema = {
    "type": ["string", "null"],
    "description": "The title set, or else the first user message (whitespace folded, at most 80 characters); "
    "null before there is one",
}
_NEW_TITLE: Schema = {
    "type": ["string", "null"],
    "pattern": "\\S",
    "maxLength": 200,
    "description": "1 to 200 characters; null: the first user message's",
}

SESSION_LINKS = {
    "GetSession": link("getSession", path=True),
    "ListMessages": link("listMessages", path=True),
    "DeleteSession": link("deleteSession", path=True),
    "ListFiles": link("listFiles", path=True),
    "Rejoin": link("rejoinChat", path=True),
    "Chat": link("chat", body={"ui_session_id": "$response.body#/ui_session_id", "message": "hello there"}),
    "Cancel": link("cancel", body={"ui_session_id": "$response.body#/ui_session_id"}),
}

_OPERATIONS: dict[Callable[..., Any], Schema] = {}
_PUBLIC: set[Callable[..., Any]] = set()  # answered without a key, even when keys are configured
_OPERATOR: set[Callable[..., Any]] = set()  # answered only with the operator's token (PARLEY_METRICS_TOKEN)


def documented(
    operation_id: str,
    summary: str,
    responses: dict[int, Schema],
    errors: tuple[int, ...] = (),
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    links: dict[str, Schema] | None = None,
    public: bool = False,
    operator: bool = False,
) -> Callable[[Handler], Handler]:
    """Describe the endpoint this decorates: its operation in the document, wherever the route table puts it.
    ``errors`` are the statuses it may answer with an error body (their meaning is :data:`parley.errors.MEANING`);
    ``public`` endpoints need no API key (probes, this document, the page); ``operator`` endpoints need the
    operator's token instead of a key (the metrics)."""
    answers = {str(status): response for status, response in responses.items()}
    for status in errors:
        answers[str(status)] = json_response(ERROR, MEANING[status])
    if links:
        first = str(min(responses))
        answers[first] = {**answers[first], "links": links}
    operation: Schema = {"operationId": operation_id, "summary": summary, "responses": answers}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body

    def register(handler: Handler) -> Handler:
        _OPERATIONS[handler] = operation
        if public:
            _PUBLIC.add(handler)
        if operator:
            _OPERATOR.add(handler)
        return handler

    return register


def served_file(
    operation_id: str, summary: str, media_type: str, *, public: bool = False, operator: bool = False
) -> Callable[[Handler], Handler]:
    content = {media_type: {"schema": TEXT}}
    responses = {200: {"description": summary, "content": content}}
    return documented(operation_id, summary, responses, public=public, operator=operator)


# The message a chat in the AI SDK's body answers: the user's, with a text part.
_USER_MESSAGE: Schema = {
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
}


def _schemas(settings: Settings) -> dict[str, Schema]:
    message: Schema = {
        **_REQUIRED_TEXT,
        "description": f"Not empty; at most {settings.max_message_bytes} bytes of UTF-8 (PARLEY_MAX_MESSAGE_BYTES)",
    }
    return {
        "Error": _object({"status": {"const": "error"}, "message": TEXT}),
        "Success": _object({"status": {"const": "success"}, "message": TEXT}),
        "Session": _object({"ui_session_id": TEXT, "agent": TEXT, "created_at": _TIME, "title": _TITLE}),
        "SessionState": _object(
            {
                "ui_session_id": TEXT,
                "agent": TEXT,
                "created_at": _TIME,
                "title": _TITLE,
                "status": {"enum": ["idle", "streaming"]},
                "queued": {"type": "integer", "minimum": 0, "description": "Messages that wait for it (enqueue)"},
                "queued_interactions": {"type": "array", "items": TEXT, "description": "Their interaction ids"},
            }
        ),
        "SessionUpdate": _object({"title": _NEW_TITLE}),
        "Message": _object(
            {
                "id": TEXT,
                "role": {"enum": list(get_args(Role))},
                "content": {
                    "type": "string",
                    "description": "Exactly the text that was streamed (the text parts joined)",
                },
                "parts": {
                    "type": "array",
                    "items": ref("Part"),
                    "description": "The AI SDK's UIMessage parts (useChat({messages}) takes the message as it is)",
                },
                "usage": {
                    "oneOf": [ref("Usage"), {"type": "null"}],
                    "description": "null when the agent reported none",
                },
                "metadata": _object({"ui_session_id": TEXT, "interaction_id": TEXT, "status": TEXT}),
                "file_ids": {"type": "array", "items": TEXT},
                "status": {"enum": list(get_args(MessageStatus))},
                "interaction_id": TEXT,
                "created_at": _TIME,
            }
        ),
        # The parts useChat keeps (step-start, reasoning, dynamic-tool, text; a user message's file parts): a client
        # restores a chat from them.
        "Part": {
            "type": "object",
            "properties": {
                "type": {"enum": ["text", "reasoning", "step-start", "dynamic-tool", "file"]},
                "text": TEXT,
                "state": {
                    "enum": [
                        "done",
                        "streaming",
                        "input-streaming",
                        "input-available",
                        "output-available",
                        "output-error",
                    ]
                },
                "id": TEXT,
                "toolName": TEXT,
                "toolCallId": TEXT,
                "input": {},
                "output": {},
                "errorText": TEXT,
                "mediaType": TEXT,
                "filename": TEXT,
                "url": {**TEXT, "description": "A file's bytes in parley (GET)"},
            },
            "required": ["type"],
        },
        "Usage": _object(
            {"input_tokens": _COUNT, "output_tokens": _COUNT, "total_tokens": _COUNT},
            {"reasoning_tokens": _COUNT, "cached_input_tokens": _COUNT},
        ),
        "File": _object(
            {
                "id": TEXT,
                "filename": TEXT,
                "mime_type": TEXT,
                "size": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "created_at": _TIME,
            }
        ),
        "CancelReply": _object(
            {
                "status": {"const": "success"},
                "message": TEXT,
                "cancelled": {"type": "boolean", "description": "Whether an interaction in progress was stopped"},
            }
        ),
        "Agent": _object(
            {
                "name": TEXT,
                "description": TEXT,
                "tools": {"type": "array", "items": ref("Tool"), "description": "The tools it offers its model"},
            }
        ),
        "Tool": _object({"name": TEXT, "description": TEXT}),
        "NewSession": _object(
            {},
            {
                "agent": {
                    "type": "string",
                    "description": "GET /api/v1/agents lists them; the server's default if absent",
                },
                "ui_session_id": {"type": "string", "pattern": f"^{SESSION_ID.pattern}$"},
                "title": _NEW_TITLE,
            },
        ),
        "ChatForm": _object(
            {"ui_session_id": _REQUIRED_TEXT, "message": message},
            {
                "file_ids": {"type": "string", "description": 'A JSON array of file ids, e.g. ["file_123"]'},
                "on_disconnect": _ON_DISCONNECT,
                "replace": _REPLACE,
                "if_busy": _IF_BUSY,
            },
        ),
        "ChatJson": _object(
            {"ui_session_id": _REQUIRED_TEXT, "message": message},
            {
                "file_ids": {"oneOf": [{"type": "array", "items": TEXT}, {"type": "string"}]},
                "on_disconnect": _ON_DISCONNECT,
                "replace": _REPLACE,
                "if_busy": _IF_BUSY,
            },
        ),
        "AiSdkChat": {
            "type": "object",
            "description": "The body of the AI SDK's DefaultChatTransport (the chat's messages), or of its recipe that "
            "sends only the last message (prepareSendMessagesRequest): parley answers the last user message's text",
            "properties": {
                "id": {**_REQUIRED_TEXT, "description": "The chat's id: parley's ui_session_id"},
                "messages": {
                    "type": "array",
                    "items": ref("UIMessage"),
                    "description": "The conversation: the last message whose role is user must have a text part",
                    "contains": _USER_MESSAGE,
                },
                "message": {**_USER_MESSAGE, "description": "Only the message to answer (parley has the rest)"},
                "trigger": {"enum": ["submit-message", "regenerate-message"]},
                "messageId": {
                    "type": "string",
                    "minLength": 1,
                    "description": "The message regenerate() or sendMessage({text, messageId}) replaces (see replace)",
                },
                "if_busy": _IF_BUSY,
                "file_ids": {"oneOf": [{"type": "array", "items": TEXT}, {"type": "string"}]},
                "on_disconnect": _ON_DISCONNECT,
            },
            "required": ["id"],
            "anyOf": [{"required": ["messages"]}, {"required": ["message"]}],
        },
        "UIMessage": {
            "type": "object",
            "properties": {
                "id": TEXT,
                "role": {"enum": ["system", "user", "assistant"]},
                "parts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": TEXT, "text": TEXT, "mediaType": TEXT, "filename": TEXT, "url": TEXT},
                    },
                    "description": "A user message's file parts (sendMessage({text, files})) become the session's "
                    "files: each url a data: URL, or a file's url in parley as history gives it",
                },
            },
        },
        "CancelForm": _object(
            {"ui_session_id": _REQUIRED_TEXT},
            {"interaction_id": {"type": "string", "description": "Cancel only this interaction (X-Interaction-Id)"}},
        ),
        "UploadForm": _object(
            {
                "ui_session_id": _REQUIRED_TEXT,
                "file": {
                    **BYTES,
                    "description": f"At most {settings.max_upload_bytes} bytes (PARLEY_MAX_UPLOAD_BYTES)",
                },
            }
        ),
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"enum": ["ok", "error"]},
                "message": TEXT,
                "checks": {"type": "object", "additionalProperties": TEXT},
            },
            "required": ["status", "checks"],
            "additionalProperties": False,
        },
    }


_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"},
}
_OPERATOR_SCHEME = {
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator's token: Authorization: Bearer <PARLEY_METRICS_TOKEN>",
    }
}
_NOT_OPERATOR: Schema = {
    "description": "Not the operator's token (PARLEY_METRICS_TOKEN): an owner's API key is not enough",
    "headers": {**REQUEST_ID, "WWW-Authenticate": {"schema": {"const": "Bearer"}}},
    "content": {"application/json": {"schema": ERROR}},
}
_UNAUTHORIZED: Schema = {
    "description": "No API key, or one that names no owner (PARLEY_API_KEYS)",
    "headers": {**REQUEST_ID, "WWW-Authenticate": {"schema": {"const": "Bearer"}}},
    "content": {"application/json": {"schema": ERROR}},
}


def _version() -> str:
    try:
        return metadata.version("parley")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "0.0.0"


def document(routes: Sequence[BaseRoute], settings: Settings, *, keys: bool) -> Schema:
    """The OpenAPI document of an app with these routes (each endpoint :func:`documented`) and settings: with the
    security schemes (and every 401) when API keys are configured, and the operator's when the metrics need a
    token (PARLEY_METRICS_TOKEN, or API keys without it: then nobody may read them)."""
    operator_only = keys or settings.metrics_token is not None
    schemes: Schema = dict(_SECURITY_SCHEMES) if keys else {}
    paths: dict[str, dict[str, Schema]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        handler = getattr(route.endpoint, "handler", route.endpoint)  # (an endpoint run as a plain ASGI app)
        operation = _OPERATIONS[handler]  # (KeyError: an endpoint that was not documented)
        if handler in _OPERATOR and operator_only:
            schemes.update(_OPERATOR_SCHEME)
            operation = {
                **operation,
                "security": [{"operatorToken": []}],
                "responses": {**operation["responses"], "401": _NOT_OPERATOR},
            }
        elif keys:
            if handler in _PUBLIC:
                operation = {**operation, "security": []}
            else:
                operation = {**operation, "responses": {**operation["responses"], "401": _UNAUTHORIZED}}
        for method in sorted((route.methods or set()) - {"HEAD"}):  # (Starlette adds HEAD to every GET)
            paths.setdefault(route.path, {})[method.lower()] = operation
    components: Schema = {
        "schemas": _schemas(settings),
        "headers": {
            "RequestId": {
                "description": "The request's id: the client's X-Request-Id, or a new one; in every log line",
                "schema": TEXT,
            }
        },
    }
    document: Schema = {
        "openapi": "3.1.0",
        "info": {
            "title": "parley",
            "version": _version(),
            "description": "Chat with an AI agent over HTTP: streamed replies, cancellable mid-stream.",
        },
        "paths": paths,
        "components": components,
    }
    if schemes:
        components["securitySchemes"] = schemes
    if keys:
        document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document
