"""The AI SDK's file parts: a user message's files as ``sendMessage({text, files})`` puts them in its parts,
``{"type": "file", "mediaType", "filename"?, "url"}``, and as history gives them back.

In a chat body, a file part's ``url`` is either a ``data:`` URL (the file's bytes, as ``sendMessage`` makes them of
a ``FileList``), which becomes a file of the session as an upload does, or the URL of a file of the session in
parley (``.../api/v1/files/<session>/<file id>/content``, as history gives it), which names that file. parley
fetches nothing: any other URL, and a ``data:`` URL that does not parse, is a 400. In history, each of a user
message's files is a part whose ``url`` is its content URL, before the message's text, as ``sendMessage`` puts
them.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from parley.errors import BadRequest, PayloadTooLarge
from parley.sessions.parts import Part
from parley.sessions.store import FileInfo

# A file's content URL, absolute or not, wherever parley is mounted: the last path segments name the file.
_CONTENT_URL = re.compile(r"(?:^|/)api/v1/files/[^/?#]+/([^/?#]+)/content(?:[?#].*)?$")
_NOT_A_FILE = (
    "A file part's url must be a data: URL (the file's bytes, as sendMessage({files}) sends them) or the URL of a "
    "file of this session in parley (as history gives it): parley fetches nothing from the network."
)


@dataclass(frozen=True)
class FilePart:
    """A file part of a chat's user message: its bytes (a ``data:`` URL), or a file the session has (its id)."""

    media_type: str
    filename: str
    data: bytes | None = None
    file_id: str | None = None


def read_file_part(part: dict[str, Any], max_bytes: int) -> FilePart:
    """A file part as the client sent it: BadRequest for one that is not a file parley can take, PayloadTooLarge
    for bytes over ``max_bytes`` (PARLEY_MAX_UPLOAD_BYTES)."""
    url, media_type, filename = part.get("url"), part.get("mediaType"), part.get("filename")
    if not isinstance(url, str) or not isinstance(media_type, str) or not isinstance(filename, str | None):
        raise BadRequest("A file part needs a url and a mediaType, as strings (and its filename, if any).")
    filename = filename or ""
    try:
        filename.encode()
    except UnicodeEncodeError:  # (JSON may carry a lone surrogate: no name a store or a client can take)
        raise BadRequest("A file part's filename is not valid Unicode text (it has a lone surrogate).") from None
    if url[:5].lower() == "data:":
        data = _data_url_bytes(url)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"The file {filename or '(unnamed)'} is larger than the limit of {max_bytes} bytes.")
        return FilePart(media_type, filename, data=data)
    named = _CONTENT_URL.search(url)
    if named is None:
        raise BadRequest(_NOT_A_FILE)
    return FilePart(media_type, filename, file_id=named.group(1))


def _data_url_bytes(url: str) -> bytes:
    # data:[<media type>][;<parameter>...][;base64],<data> (RFC 2397)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise BadRequest("A file part's data: URL has no comma before its data.")
    if header.rsplit(";", 1)[-1].strip().lower() != "base64":
        return unquote_to_bytes(payload)
    try:
        return b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("A file part's data: URL is not valid base64.") from None


def content_url(root_path: str, session_id: str, file_id: str) -> str:
    """The path of a file's bytes (GET), under the path parley is mounted at."""
    return f"{root_path}/api/v1/files/{quote(session_id, safe='')}/{quote(file_id, safe='')}/content"


def history_parts(file_ids: Sequence[str], files: Mapping[str, FileInfo], root_path: str) -> list[Part]:
    """The file parts of a user message's files (those still there), as the AI SDK's ``FileUIPart``."""
    parts: list[Part] = []
    for file_id in file_ids:
        info = files.get(file_id)
        if info is not None:
            url = content_url(root_path, info.session_id, info.id)
            parts.append({"type": "file", "mediaType": info.mime_type, "filename": info.filename, "url": url})
    return parts
