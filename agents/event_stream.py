from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable

_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncGenerator[str, None]:
    """The ``data`` of each server-sent event in a byte stream, however the stream was cut into reads.

    Follows the EventSource rules: lines end in CRLF, LF or CR; a line starting with ``:`` is a comment
    (a keep-alive); the ``data:`` lines of one event are joined with newlines; a blank line ends the
    event. Other fields (``event``, ``id``, ``retry``) are ignored: an OpenAI stream does not use them.
    """
    buffer = b""
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        while match := _LINE_END.search(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe the first half of a CRLF cut between two reads
            line, buffer = buffer[: match.start()], buffer[match.end() :]
            if line:
                _add_field(line, data)
            elif data:
                yield "\n".join(data)
                data = []
    if buffer.strip(b"\r"):
        _add_field(buffer.rstrip(b"\r"), data)
    if data:
        # The stream ended without the event's blank line: deliver what it said rather than lose it.
        yield "\n".join(data)


def _add_field(line: bytes, data: list[str]) -> None:
    if line.startswith(b"data:"):
        value = line[5:]
        data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", errors="replace"))
