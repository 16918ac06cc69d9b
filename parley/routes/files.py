"""Files: upload (streamed to disk, bounded), list, read (metadata, bytes) and delete a session's files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from parley.errors import BadRequest, PayloadTooLarge
from parley.file_parts import FilePart
from parley.forms import FORM_MARGIN_BYTES, bounded
from parley.openapi import (
    BYTES,
    FILE_PARAMETER,
    REQUEST_ID,
    SESSION_PARAMETER,
    documented,
    form,
    json_response,
    list_of,
    ref,
)
from parley.routes import authenticated, owned_session
from parley.service import Parley
from parley.sessions.errors import FileNotFound
from parley.sessions.files import Blob, FileTooLarge, content_disposition, mime_type, safe_filename
from parley.sessions.store import FileInfo, new_id, utcnow
from parley.uploads import receive_upload


@documented(
    "uploadFile",
    "Upload a file to a session (multipart, the bytes in the part named file)",
    {201: json_response(ref("File"), "The file's metadata")},
    (400, 404, 408, 413, 503),
    body=form(ref("UploadForm"), urlencoded=False),
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
async def upload_file(request: Request) -> Response:
    parley, owner = await authenticated(request)
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
        await owned_session(parley, session_id, owner)
        blob = await writer.commit(session_id)
    info = await _record(parley, file_id, session_id, upload.filename or "", upload.declared_type, blob)
    return JSONResponse(info.to_json(), status_code=201)


async def _record(
    parley: Parley, file_id: str, session_id: str, filename: str, declared_type: str | None, blob: Blob
) -> FileInfo:
    """Store the record of a blob just committed (or remove the blob, if that fails)."""
    filename = safe_filename(filename)
    info = FileInfo(file_id, session_id, filename, mime_type(declared_type, filename), blob.size, blob.sha256, utcnow())
    try:
        await parley.store.add_file(info)  # SessionNotFound if the session was deleted since it was looked up
    except BaseException:
        with anyio.CancelScope(shield=True):
            await parley.blobs.delete(file_id)
        raise
    await parley.blobs.settle(file_id)
    return info


async def keep_file_parts(parley: Parley, session_id: str, parts: Sequence[FilePart], stored: list[str]) -> list[str]:
    """The files of a chat's file parts (see :mod:`parley.file_parts`), in their order. A part's bytes become a
    file of the session as an upload's do (added to ``stored`` at once, so that the caller knows them whatever
    fails next), unless the session has a file of the same name and bytes already (the AI SDK sends a message's
    data: URLs again when it regenerates the reply): that one is named instead."""
    named: list[str] = []
    have: dict[tuple[str, str], str] = {}
    if any(part.data is not None for part in parts):
        have = {(info.filename, info.sha256): info.id for info in await parley.store.list_files(session_id)}
    for part in parts:
        if part.data is None:
            assert part.file_id is not None
            named.append(part.file_id)
            continue
        filename = safe_filename(part.filename)
        key = (filename, hashlib.sha256(part.data).hexdigest())
        if key not in have:
            file_id = new_id("file_")
            async with parley.blobs.writer(file_id, parley.settings.max_upload_bytes) as writer:
                await writer.write(part.data)  # (read_file_part has checked its size)
                blob = await writer.commit(session_id)
            have[key] = (await _record(parley, file_id, session_id, filename, part.media_type, blob)).id
            stored.append(file_id)
        named.append(have[key])
    return named


async def _file(parley: Parley, request: Request, owner: str) -> FileInfo:
    session = await owned_session(parley, request.path_params["session_id"], owner)
    file_id = request.path_params["file_id"]
    info = await parley.store.get_file(session.ui_session_id, file_id)
    if info is None:
        raise FileNotFound(file_id)
    return info


@documented(
    "listFiles",
    "The session's files",
    {200: json_response(list_of("files", "File"), "The files' metadata")},
    (404, 503),
    parameters=[SESSION_PARAMETER],
)
async def list_files(request: Request) -> Response:
    parley, owner = await authenticated(request)
    session = await owned_session(parley, request.path_params["session_id"], owner)
    files = await parley.store.list_files(session.ui_session_id)
    return JSONResponse({"files": [info.to_json() for info in files]})


@documented(
    "getFile",
    "A file's metadata",
    {200: json_response(ref("File"), "The file's metadata")},
    (404, 503),
    parameters=[SESSION_PARAMETER, FILE_PARAMETER],
)
async def get_file(request: Request) -> Response:
    parley, owner = await authenticated(request)
    return JSONResponse((await _file(parley, request, owner)).to_json())


@documented(
    "getFileContent",
    "A file's bytes, as an attachment, with the type it was uploaded with",
    {200: {"description": "The bytes", "headers": REQUEST_ID, "content": {"*/*": {"schema": BYTES}}}},
    (404, 503),
    parameters=[SESSION_PARAMETER, FILE_PARAMETER],
)
async def get_file_content(request: Request) -> Response:
    parley, owner = await authenticated(request)
    info = await _file(parley, request, owner)
    content = await parley.blobs.content(info.id)
    headers = {"content-disposition": content_disposition(info.filename), "x-content-type-options": "nosniff"}
    if isinstance(content, Path):
        return FileResponse(content, media_type=info.mime_type, headers=headers)
    headers["content-length"] = str(info.size)
    return StreamingResponse(content, media_type=info.mime_type, headers=headers)


@documented(
    "deleteFile",
    "Delete a file",
    {200: json_response(ref("Success"), "Deleted")},
    (404, 503),
    parameters=[SESSION_PARAMETER, FILE_PARAMETER],
)
async def delete_file(request: Request) -> Response:
    parley, owner = await authenticated(request)
    info = await _file(parley, request, owner)
    await parley.store.delete_file(info.session_id, info.id)
    await parley.blobs.delete(info.id)
    return JSONResponse({"status": "success", "message": f"File {info.filename} deleted"})
