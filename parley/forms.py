from __future__ import annotations

import json
import json.scanner
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import replace as replace_fields
from typing import Any
from urllib.parse import unquote_plus

import anyio
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from parley.errors import BadRequest, BodyTimeout, PayloadTooLarge
from parley.file_parts import FilePart, read_file_part
from parley.sessions.store import TITLE_MAX_CHARS

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# Every body has a bound suited to its endpoint (README, "Limits"): small option bodies (a session's
# JSON, a cancel's form) get OPTIONS_BODY_BYTES; a chat gets its message limit plus FORM_MARGIN_BYTES;
# an upload its file limit plus FORM_MARGIN_BYTES; and no form has more than MAX_FIELDS fields.
OPTIONS_BODY_BYTES = 64 * 1024
FORM_MARGIN_BYTES = 64 * 1024
MAX_FIELDS = 16


def header(request: Request, name: bytes) -> str:
    """A request header's value, "" when it is absent; ``name`` in lower case, as ASGI gives names. (Read from
    the scope: request.headers builds a mapping first, and looks up an absent name by raising KeyError.)"""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _content_type(request: Request) -> str:
    return header(request, b"content-type").split(";")[0].strip().lower()


def chat_body_limit(request: Request, max_message_bytes: int) -> int:
    """The largest chat body: the message, with room for the other fields (x3 when urlencoded: %XX; x16 for
    JSON, where the AI SDK sends the conversation's earlier messages too)."""
    factor = {"application/x-www-form-urlencoded": 3, "application/json": 16}.get(_content_type(request), 1)
    return factor * max_message_bytes + FORM_MARGIN_BYTES


def bounded(request: Request, max_bytes: int, timeout: float) -> Request:
    """The request, with its body counted as it arrives (PayloadTooLarge past ``max_bytes``, whatever the
    transfer encoding, chunked included) and dropped if it stalls for ``timeout`` seconds (BodyTimeout)."""
    declared = header(request, b"content-length")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The request body is larger than the limit of {max_bytes} bytes for this endpoint.")
    received = 0
    receive = request.receive

    async def counted() -> Message:
        nonlocal received
        with anyio.move_on_after(timeout) as waiting:
            message = await receive()
        if waiting.cancelled_caught:
            raise BodyTimeout(f"The request body stopped arriving for {timeout:g} seconds.")
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise PayloadTooLarge(
                    f"The request body is larger than the limit of {max_bytes} bytes for this endpoint."
                )
        return message

    return Request(request.scope, counted)


# A form's fields by name (a repeated name: its last value, as Starlette's FormData gives it).
Form = Mapping[str, str | UploadFile]


async def read_form(request: Request, *, max_field_bytes: int = 64 * 1024, max_fields: int = MAX_FIELDS) -> Form:
    """The request's form fields (multipart or urlencoded), with every failure a clear 4xx."""
    return await _read_form(request, _content_type(request), max_field_bytes, max_fields)


async def _read_form(request: Request, content_type: str, max_field_bytes: int, max_fields: int) -> Form:
    if content_type not in _FORM_TYPES:
        if not content_type and not await request.body():
            return FormData()  # no body at all: let the required fields say what is missing
        raise BadRequest("Send the fields as multipart/form-data or application/x-www-form-urlencoded.")
    # An urlencoded field can be three times its decoded size; the real limit is checked after decoding.
    max_part_size = 3 * max_field_bytes + 1024
    if content_type == "application/x-www-form-urlencoded":
        return await _read_urlencoded(request, max_part_size, max_field_bytes, max_fields)
    try:
        return await request.form(max_files=0, max_fields=max_fields, max_part_size=max_part_size)
    except HTTPException as exc:
        if "maximum size" in exc.detail:
            raise PayloadTooLarge(f"A form field is larger than the limit of {max_field_bytes} bytes.") from None
        raise BadRequest(f"The form could not be parsed: {exc.detail}") from None


async def _read_urlencoded(request: Request, max_size: int, max_field_bytes: int, max_fields: int) -> Form:
    # The standard library's parser over the (bounded) body: cheaper than the streaming parser, which counts
    # for short chats, and it reads raw UTF-8 as UTF-8 where the streaming one reads it as Latin-1.
    body = await _read_at_most(request, max_size, f"A form field is larger than the limit of {max_field_bytes} bytes.")
    text = body.decode("utf-8", errors="replace")
    if text.count("&") >= max_fields:
        raise BadRequest(f"The form has too many fields (at most {max_fields}).")
    return _urlencoded_fields(text)


def _urlencoded_fields(text: str) -> dict[str, str | UploadFile]:
    """``dict(parse_qsl(text, keep_blank_values=True))``, in a few steps where it takes dozens (a chat's form is two
    short fields, most often with nothing to unquote), and a plain dict rather than a FormData, whose lookups are
    Python code."""
    fields: dict[str, str | UploadFile] = {}
    for pair in text.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name, value = unquote_plus(name), unquote_plus(value)
            fields[name] = value
    return fields


async def _read_at_most(request: Request, limit: int, too_large: str) -> bytes:
    # The ASGI messages read as they come rather than through request.stream(), an async generator: every
    # chat pays for this, and its body is one message.
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def loads(raw: str | bytes | bytearray, what: str) -> Any:
    """JSON from a client: whatever the parser raises (a RecursionError for deep nesting too) is a 400."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON.") from None


async def read_json_or_form(request: Request) -> dict[str, Any]:
    """A small body of options, as JSON or as a form; an empty body is no options."""
    content_type = _content_type(request)
    if content_type == "application/json":
        body = await request.body()
        if not body.strip():
            return {}
        data = loads(body, "The body")
        if not isinstance(data, dict):
            raise BadRequest("The JSON body must be an object.")
        return data
    if content_type in _FORM_TYPES:
        return {key: value for key, value in (await read_form(request)).items()}
    if await request.body():
        raise BadRequest("Send the fields as JSON, multipart/form-data or application/x-www-form-urlencoded.")
    return {}


def required_text(form: Form, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"The field '{name}' is required and must not be empty.")
    return value


def optional_text(form: Form, name: str) -> str | None:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise BadRequest(f"The field '{name}' must be text, not a file.")
    return value


def parse_file_ids(raw: str | None) -> list[str]:
    if raw is None:
        return []
    try:
        value = loads(raw, "file_ids")
    except BadRequest:
        raise BadRequest('Invalid file_ids format: expected a JSON array of strings, like ["file_123"].') from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest('Invalid file_ids format: expected a JSON array of strings, like ["file_123"].')
    return list(dict.fromkeys(value))


def session_title(value: Any) -> str | None:
    """A title a client sets: text of 1 to 200 characters (surrounding whitespace dropped); None (JSON null, or
    left out) for the one taken from the first user message."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > TITLE_MAX_CHARS:
        raise BadRequest(f"title must be text of 1 to {TITLE_MAX_CHARS} characters (or null, for the first message's).")
    return value.strip()


def query_int(request: Request, name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"The query parameter '{name}' must be a whole number.") from None
    if not minimum <= value <= maximum:
        raise BadRequest(f"The query parameter '{name}' must be between {minimum} and {maximum}.")
    return value


@dataclass(frozen=True)
class ChatRequest:
    """A chat message as sent: a form (the spec's), parley's JSON, or the AI SDK's ``DefaultChatTransport`` body."""

    session_id: str
    message: str
    file_ids: list[str]
    on_disconnect: str | None
    ai_sdk: bool  # the body is the AI SDK's (it has "messages")
    # The message this one takes the place of, with all after it (a regenerate or an edit; see
    # TurnRequest.replace), and whether a missing one makes it a plain turn; the client's id for the message.
    replace: str | None = None
    missing_ok: bool = False
    keep: bool = False
    client_id: str = ""
    if_busy: str | None = None
    files: tuple[FilePart, ...] = ()  # the AI SDK's file parts of the message (see parley.file_parts)


_ON_DISCONNECT = ("cancel", "continue")
_IF_BUSY = ("reject", "interrupt", "enqueue")


async def read_chat(request: Request, *, max_message_bytes: int, max_file_bytes: int) -> ChatRequest:
    """The chat as sent; ``max_file_bytes`` bounds each file of an AI SDK message's file parts."""
    content_type = _content_type(request)
    if content_type == "application/json":
        chat = _chat_json(await _read_json(request, 16 * max_message_bytes + 64 * 1024), max_file_bytes)
    else:
        form = await _read_form(request, content_type, max_message_bytes, MAX_FIELDS)
        replace = optional_text(form, "replace")
        chat = ChatRequest(
            required_text(form, "ui_session_id"),
            (optional_text(form, "message") or "") if replace else required_text(form, "message"),
            parse_file_ids(optional_text(form, "file_ids")),
            optional_text(form, "on_disconnect"),
            ai_sdk=False,
            replace=replace,
            if_busy=optional_text(form, "if_busy"),
        )
    try:
        # JSON may carry a lone surrogate ("\ud800", or the raw bytes ED A0 80, which json.loads lets through):
        # not text any store, model or client can take.
        size = len(chat.message.encode())
        for text in (chat.session_id, *chat.file_ids):
            text.encode()
    except UnicodeEncodeError:
        raise BadRequest("The chat is not valid Unicode text (it has a lone surrogate).") from None
    if size > max_message_bytes:
        raise PayloadTooLarge(f"The message is larger than the limit of {max_message_bytes} bytes.")
    on_disconnect = chat.on_disconnect
    if on_disconnect is None and b"on_disconnect" in request.scope.get("query_string", b""):
        on_disconnect = request.query_params.get("on_disconnect")  # (parsed only when it may be there)
    if on_disconnect is not None and on_disconnect not in _ON_DISCONNECT:
        raise BadRequest("on_disconnect must be 'cancel' or 'continue'.")
    if on_disconnect != chat.on_disconnect:
        chat = replace_fields(chat, on_disconnect=on_disconnect)
    if_busy = chat.if_busy
    if if_busy is None and b"if_busy" in request.scope.get("query_string", b""):
        if_busy = request.query_params.get("if_busy")
    if if_busy is not None and if_busy not in _IF_BUSY:
        raise BadRequest("if_busy must be 'reject', 'interrupt' or 'enqueue'.")
    if if_busy != chat.if_busy:
        chat = replace_fields(chat, if_busy=if_busy)
    return chat


# A JSON body is parsed on the event loop while it holds few objects and arrays (each costs ~0.3 µs to build:
# 10,000 are a few milliseconds); one with more is parsed in a worker thread, by the standard library's
# Python scanner: the C one holds the GIL from start to end (1.4 M "{}", 400 ms, would stall every stream of
# the process), the Python one lets the loop in every few milliseconds. It also bounds the work: past
# MAX_JSON_CONTAINERS it stops, and the body is refused.
_JSON_ON_THE_LOOP = 10_000
MAX_JSON_CONTAINERS = 100_000


async def _read_json(request: Request, limit: int) -> Any:
    raw = await _read_at_most(request, limit, f"The body is larger than the limit of {limit} bytes.")
    # At least the number of objects and arrays (a brace inside a string counts too): ~1 ms a megabyte.
    if raw.count(b"{") + raw.count(b"[") <= _JSON_ON_THE_LOOP:
        return loads(raw, "The body")
    return await anyio.to_thread.run_sync(_loads_bounded, raw)


def _loads_bounded(raw: bytes) -> Any:
    count = 0

    def counted(parse: Callable[..., Any]) -> Callable[..., Any]:
        def parse_counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count > MAX_JSON_CONTAINERS:
                raise PayloadTooLarge(f"The JSON body has more than {MAX_JSON_CONTAINERS} objects and arrays.")
            return parse(*args, **kwargs)

        return parse_counted

    decoder: Any = json.JSONDecoder()  # (its scanner's hooks are not in the typeshed stubs)
    decoder.parse_object = counted(decoder.parse_object)
    decoder.parse_array = counted(decoder.parse_array)
    scanner: Any = json.scanner
    decoder.scan_once = scanner.py_make_scanner(decoder)
    try:
        return decoder.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None


def _chat_json(data: Any, max_file_bytes: int) -> ChatRequest:
    if not isinstance(data, dict):
        raise BadRequest("The JSON body must be an object.")
    on_disconnect, if_busy = data.get("on_disconnect"), data.get("if_busy")
    if on_disconnect is not None and not isinstance(on_disconnect, str):
        raise BadRequest("on_disconnect must be 'cancel' or 'continue'.")
    if if_busy is not None and not isinstance(if_busy, str):
        raise BadRequest("if_busy must be 'reject', 'interrupt' or 'enqueue'.")
    file_ids = data.get("file_ids")
    if isinstance(file_ids, str):
        file_ids = parse_file_ids(file_ids)
    elif file_ids is None:
        file_ids = []
    elif not isinstance(file_ids, list) or not all(isinstance(item, str) for item in file_ids):
        raise BadRequest('Invalid file_ids format: expected a JSON array of strings, like ["file_123"].')
    file_ids = list(dict.fromkeys(file_ids))
    # The AI SDK's body has the chat's "messages", or only the last one as "message" (its recipe for sending only
    # the new message, prepareSendMessagesRequest: parley has the rest); parley's own has "message" as text.
    if "messages" in data:
        messages = data["messages"]
    elif isinstance(data.get("message"), dict):
        messages = [data["message"]]
    else:
        session_id, message, replace = data.get("ui_session_id"), data.get("message"), data.get("replace")
        if replace is not None and (not isinstance(replace, str) or not replace.strip()):
            raise BadRequest("replace must be the id of a message of the session.")
        if replace and message is None:
            message = ""  # (a regenerate answers the user message before the reply it replaces)
        elif not isinstance(message, str) or not message.strip():
            raise BadRequest("The field 'message' is required and must not be empty.")
        if not isinstance(session_id, str) or not session_id.strip():
            raise BadRequest("The field 'ui_session_id' is required and must not be empty.")
        if not isinstance(message, str):
            raise BadRequest("The field 'message' must be text.")
        return ChatRequest(
            session_id, message, file_ids, on_disconnect, ai_sdk=False, replace=replace or None, if_busy=if_busy
        )
    session_id = data.get("id")
    if not isinstance(session_id, str) or not session_id.strip():
        raise BadRequest("The field 'id' (the chat's id, parley's ui_session_id) is required and must not be empty.")
    trigger = data.get("trigger", "submit-message")
    if trigger not in ("submit-message", "regenerate-message"):
        raise BadRequest("trigger must be 'submit-message' or 'regenerate-message'.")
    message_id = data.get("messageId")
    if message_id is not None and (not isinstance(message_id, str) or not message_id):
        raise BadRequest("messageId must be the id of a message of the chat.")
    # Both triggers answer the last user message, the client's own copy of history: after regenerate() it is the
    # message before the reply the client dropped (messageId names the reply, or nothing: the last one); after
    # sendMessage({text, messageId}), the edited message. In history, that message takes the place of the one
    # with its id (or, when the SDK named one, of messageId's) with all that followed; a new one is appended.
    client_id, message, files = _last_user_message(messages, max_file_bytes)
    replace, missing_ok = (message_id, False) if message_id is not None else (client_id or None, True)
    keep = trigger == "regenerate-message"  # (the user message it answers stays as it is)
    return ChatRequest(
        session_id, message, file_ids, on_disconnect, True, replace, missing_ok, keep, client_id, if_busy, files
    )


def _last_user_message(messages: Any, max_file_bytes: int) -> tuple[str, str, tuple[FilePart, ...]]:
    """The id (when it is one parley keeps: 1 to 128 letters, digits, '_' or '-', as the AI SDK's own ids and UUIDs
    are), the text and the file parts of the last user message."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be an array of UI messages.")
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        parts = message.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise BadRequest("A UI message's parts must be an array of objects.")
        texts = [p.get("text") for p in parts if p.get("type") == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("A text part's text must be a string.")
        text = "".join(t for t in texts if isinstance(t, str))
        if not text.strip():
            raise BadRequest("The last user message has no text.")
        client_id = message.get("id")
        if not isinstance(client_id, str) or not SESSION_ID.fullmatch(client_id):
            client_id = ""  # (the message gets parley's own id)
        files = tuple(read_file_part(part, max_file_bytes) for part in parts if part.get("type") == "file")
        return client_id, text, files
    raise BadRequest("messages has no user message to answer.")
