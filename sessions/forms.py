from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

import anyio
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message

from sessions.errors import BadRequest, BodyTimeout, PayloadTooLarge

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# Every body has a bound suited to its endpoint (README, "Limits"): small option bodies (a session's
# JSON, a cancel's form) get OPTIONS_BODY_BYTES; a chat gets its message limit plus FORM_MARGIN_BYTES;
# an upload its file limit plus FORM_MARGIN_BYTES; and no form has more than MAX_FIELDS fields.
OPTIONS_BODY_BYTES = 64 * 1024
FORM_MARGIN_BYTES = 64 * 1024
MAX_FIELDS = 16


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def chat_body_limit(request: Request, max_message_bytes: int) -> int:
    """The largest chat body: the message, with room for the other fields (x3 when urlencoded: %XX; x16 for
    JSON, where the AI SDK sends the conversation's earlier messages too)."""
    factor = {"application/x-www-form-urlencoded": 3, "application/json": 16}.get(_content_type(request), 1)
    return factor * max_message_bytes + FORM_MARGIN_BYTES


def bounded(request: Request, max_bytes: int, timeout: float) -> Request:
    """The request, with its body counted as it arrives (PayloadTooLarge past ``max_bytes``, whatever the
    transfer encoding, chunked included) and dropped if it stalls for ``timeout`` seconds (BodyTimeout)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
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


async def read_form(request: Request, *, max_field_bytes: int = 64 * 1024, max_fields: int = MAX_FIELDS) -> FormData:
    """The request's form fields (multipart or urlencoded), with every failure a clear 4xx."""
    content_type = _content_type(request)
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


async def _read_urlencoded(request: Request, max_size: int, max_field_bytes: int, max_fields: int) -> FormData:
    # The standard library's parser over the (bounded) body: cheaper than the streaming parser, which counts
    # for short chats, and it reads raw UTF-8 as UTF-8 where the streaming one reads it as Latin-1.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_size:
            raise PayloadTooLarge(f"A form field is larger than the limit of {max_field_bytes} bytes.")
    try:
        fields: list[tuple[str, str | UploadFile]] = list(
            parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=max_fields)
        )
    except ValueError:
        raise BadRequest(f"The form has too many fields (at most {max_fields}).") from None
    return FormData(fields)


def loads(raw: str | bytes, what: str) -> Any:
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


def required_text(form: FormData, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"The field '{name}' is required and must not be empty.")
    return value


def optional_text(form: FormData, name: str) -> str | None:
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
