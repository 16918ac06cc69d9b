from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from parley.errors import BadRequest
from parley.forms import MAX_FIELDS
from parley.sessions.files import BlobWriter

MAX_FIELD_BYTES = 64 * 1024
# Clients send very long filenames; they are cut to size afterwards, so let the header line carry them.
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Upload:
    fields: dict[str, str]
    filename: str | None = None
    declared_type: str | None = None


async def receive_upload(request: Request, writer: BlobWriter, file_field: str = "file") -> Upload:
    """Parse a multipart body as it arrives: text fields into memory, the ``file_field`` part into ``writer``.

    Raises BadRequest for a body that is not such a form, and FileTooLarge past the writer's limit.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise BadRequest("Upload the file as multipart/form-data, in a part named 'file'.")

    upload = Upload(fields={})
    part = _Part()
    header_name = bytearray()
    header_value = bytearray()
    pending: list[bytes] = []  # file bytes parsed from the latest network read, written out after it
    seen_file = False

    parts = 0

    def on_part_begin() -> None:
        nonlocal part, parts
        parts += 1
        if parts > MAX_FIELDS + 1:
            raise BadRequest(f"The upload has too many fields (at most {MAX_FIELDS} besides the file).")
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part.headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal seen_file
        _, options = parse_options_header(part.headers.get(b"content-disposition"))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if part.name != file_field or seen_file:
                raise BadRequest(f"Send exactly one file, in a part named '{file_field}'.")
            seen_file = True
            part.filename = options[b"filename"].decode("utf-8", "replace")
            upload.filename = part.filename
            declared = part.headers.get(b"content-type")
            upload.declared_type = declared.decode("latin-1") if declared else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.filename is not None:
            pending.append(data[start:end])
        else:
            part.data.extend(data[start:end])
            if len(part.data) > MAX_FIELD_BYTES:
                raise BadRequest(f"The form field '{part.name}' is too large.")

    def on_part_end() -> None:
        if part.filename is None:
            upload.fields[part.name] = part.data.decode("utf-8", "replace")

    try:
        # (Inside the try: the constructor refuses a boundary it cannot use, such as one too long.)
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
            max_header_size=MAX_HEADER_BYTES,
        )
        async for chunk in request.stream():
            parser.write(chunk)
            for data in pending:
                await writer.write(data)
            pending.clear()
        parser.finalize()
    except FormParserError:
        raise BadRequest("The upload could not be parsed as multipart/form-data.") from None
    if parser.state != MultipartState.END:
        # The body ended before its closing boundary: the file in it may be cut short.
        raise BadRequest("The upload ended before its closing boundary: it is incomplete, and nothing was kept.")
    if not seen_file:
        raise BadRequest(f"The upload has no file: send it in a part named '{file_field}'.")
    return upload
