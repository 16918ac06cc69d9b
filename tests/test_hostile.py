"""Hostile and unlucky clients (issues 10 and 15): bodies without a bound, cut off, stalled or abandoned,
bodies no parser can read, wrong JSON types, and the headers an HTTP error must keep."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

import anyio
import anyio.lowlevel
import httpx
import pytest

from tests.conftest import LiveServer, Subprocess, eventually, messages, new_session

pytestmark = pytest.mark.anyio

BOUNDARY = "hostileboundary"


@pytest.fixture
def server(live: Callable[..., LiveServer]) -> LiveServer:
    return live(max_upload_bytes=4096, max_message_bytes=1000, body_timeout_seconds=1.0)


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as client:
        yield client


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


async def raw_exchange(
    url: str, head: str, chunks: Iterable[bytes], *, chunked: bool = False, close: bool = False, within: float = 20
) -> tuple[int | None, int]:
    """Send a request by hand, chunk by chunk, stopping as soon as the server answers (or, with ``close``,
    hanging up after the last chunk). Returns the status (None if the server only closed) and bytes sent."""
    address = urlparse(url)
    sent = 0
    answer = b""
    with anyio.fail_after(within):
        async with await anyio.connect_tcp(address.hostname or "", address.port or 80) as stream:

            async def read() -> None:
                nonlocal answer
                try:
                    answer = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()  # an answer (or a hang-up) ends the sending too

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await stream.send(head.encode())
                for chunk in chunks:
                    data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
                    try:
                        await stream.send(data)
                    except (anyio.BrokenResourceError, OSError):
                        break
                    sent += len(chunk)
                    await anyio.lowlevel.checkpoint()
                if close:
                    tg.cancel_scope.cancel()
    return (int(answer.split()[1]) if answer else None), sent


def request_head(path: str, content_type: str, *, length: int | None = None) -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"


def blobs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "data" / "files"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# issue 15


async def test_a_405_keeps_its_allow_header(client: httpx.AsyncClient) -> None:
    response = await client.put("/api/v1/sessions")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert response.json()["status"] == "error"


@pytest.mark.parametrize("send", ["form", "json"])
async def test_an_empty_ui_session_id_is_a_400_not_a_generated_id(client: httpx.AsyncClient, send: str) -> None:
    if send == "form":
        response = await client.post("/api/v1/sessions", data={"ui_session_id": ""})
    else:
        response = await client.post("/api/v1/sessions", json={"ui_session_id": ""})
    assert response.status_code == 400, response.text
    assert "ui_session_id" in response.json()["message"]
    assert (await client.get("/api/v1/sessions")).json()["sessions"] == []


# issue 10, item 10: wrong JSON types are not "absent"


@pytest.mark.parametrize("body", [{"agent": False}, {"agent": 0}, {"ui_session_id": 0}, {"ui_session_id": False}])
async def test_json_fields_of_the_wrong_type_are_a_400(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    response = await client.post("/api/v1/sessions", json=body)
    assert response.status_code == 400, response.text
    assert (await client.get("/api/v1/sessions")).json()["sessions"] == []


# item 4: whatever the parser raises, a body it cannot read is a 400


async def test_bodies_no_parser_can_read_are_400s(live: Callable[..., LiveServer], tmp_path: Path) -> None:
    async with live().client() as client:  # default limits: "[" x 5000 is a field of a welcome size
        await _unparseable(client, tmp_path)


async def _unparseable(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id = await new_session(client)
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="ui_session_id"\r\n\r\n{session_id}\r\n--{boundary}--'
    long_boundary = await client.post(
        "/api/v1/files", content=body.encode(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert long_boundary.status_code == 400, long_boundary.text
    deep_ids = await client.post(
        "/api/v1/chat", data={"ui_session_id": session_id, "message": "hi", "file_ids": "[" * 5000}
    )
    assert deep_ids.status_code == 400, deep_ids.text
    assert "file_ids" in deep_ids.json()["message"]
    deep_json = await client.post(
        "/api/v1/sessions", content=b'{"agent": ' + b"[" * 20000, headers={"content-type": "application/json"}
    )
    assert deep_json.status_code == 400, deep_json.text
    assert await messages(client, session_id) == []
    assert blobs(tmp_path) == []


# item 3: an upload without its closing boundary is not a file


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_cut_off_upload_is_a_400_and_leaves_nothing(
    server: LiveServer, client: httpx.AsyncClient, tmp_path: Path, chunked: bool
) -> None:
    session_id = await new_session(client)
    body = (
        part("ui_session_id", session_id.encode())
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="report.txt"\r\n'.encode()
        + b"Content-Type: text/plain\r\n\r\nfirst half of the fi"
    )
    if chunked:
        head = request_head("/api/v1/files", MULTIPART)
        status, _ = await raw_exchange(server.url, head, [body, b""], chunked=True)  # ends cleanly: 0-size chunk
    else:
        status, _ = await raw_exchange(server.url, request_head("/api/v1/files", MULTIPART, length=len(body)), [body])
    assert status == 400
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []
    await eventually(lambda: _no_blobs(tmp_path))
    # The same body with its closing boundary is a file.
    whole = body + b"\r\n" + END
    status, _ = await raw_exchange(server.url, request_head("/api/v1/files", MULTIPART, length=len(whole)), [whole])
    assert status == 201


async def _no_blobs(tmp_path: Path) -> bool:
    return blobs(tmp_path) == []


# item 9: every body has a bound, counted as it arrives, chunked or not


async def test_a_session_body_is_bounded_even_when_chunked(server: LiveServer, client: httpx.AsyncClient) -> None:
    chunks = itertools.chain(  # 64 MB of whitespace, then the JSON: the server answers long before it
        itertools.repeat(b" " * 65536, 1024), [b'{"agent": "echo"}', b""]
    )
    status, sent = await raw_exchange(
        server.url, request_head("/api/v1/sessions", "application/json"), chunks, chunked=True
    )
    assert status == 413
    assert sent < 32 * 1024 * 1024  # (what the sockets' buffers held, at most)
    declared = await client.post(
        "/api/v1/sessions", content=b" " * (70 * 1024) + b"{}", headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert (await client.get("/api/v1/sessions")).json()["sessions"] == []


async def test_an_upload_bounds_its_fields_in_count_and_size(
    server: LiveServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    session_id = await new_session(client)
    fields = (part(f"field{i}", b"x" * 60_000) for i in range(1000))  # 60 MB of fields
    file = part("ui_session_id", session_id.encode()) + part("file", b"tiny", filename="a.txt") + END
    status, sent = await raw_exchange(
        server.url, request_head("/api/v1/files", MULTIPART), itertools.chain(fields, [file, b""]), chunked=True
    )
    assert status == 413
    assert sent < 32 * 1024 * 1024
    many = b"".join(part(f"f{i}", b"x") for i in range(40)) + file
    status, _ = await raw_exchange(server.url, request_head("/api/v1/files", MULTIPART), [many, b""], chunked=True)
    assert status == 400
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []
    await eventually(lambda: _no_blobs(tmp_path))


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_chat_body_is_bounded_in_size_and_field_count(
    server: LiveServer, client: httpx.AsyncClient, chunked: bool
) -> None:
    session_id = await new_session(client)
    chat = part("ui_session_id", session_id.encode()) + part("message", b"hello")
    # Over the size bounds only: with many fields it would also be over the field count, and which of the two
    # a server meets first depends on how the body's bytes are split into reads.
    padding = part("pad", b"y" * 300_000)
    body = padding + chat + END
    head = request_head("/api/v1/chat", MULTIPART, length=None if chunked else len(body))
    status, _ = await raw_exchange(server.url, head, [body, b""] if chunked else [body], chunked=chunked)
    assert status == 413
    many = b"".join(part(f"f{i}", b"z") for i in range(40)) + chat + END
    head = request_head("/api/v1/chat", MULTIPART, length=None if chunked else len(many))
    status, _ = await raw_exchange(server.url, head, [many, b""] if chunked else [many], chunked=chunked)
    assert status == 400
    assert await messages(client, session_id) == []
    # Within the bounds, the same chat is welcome.
    fine = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "é" * 500})
    assert (fine.status_code, fine.text) == (200, "é" * 500)


# item 10: a body that stops arriving, a client that leaves, partial files of a killed process


async def test_a_stalled_upload_is_dropped_and_its_partial_file_removed(
    server: LiveServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    session_id = await new_session(client)
    start = part("ui_session_id", session_id.encode()) + (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n'.encode()
        + b"a" * 2000
    )
    address = urlparse(server.url)
    with anyio.fail_after(20):
        async with await anyio.connect_tcp(address.hostname or "", address.port or 80) as stream:
            await stream.send(request_head("/api/v1/files", MULTIPART, length=60_000).encode() + start)
            partial = tmp_path / "data" / "files" / ".partial"
            await eventually(lambda: _exists(partial, "*.part"))
            answer = await stream.receive()  # the server gives up on the body (1 s here) and answers
    assert int(answer.split()[1]) == 408
    await eventually(lambda: _gone(partial, "*.part"))
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []


async def _exists(directory: Path, pattern: str) -> bool:
    return bool([path async for path in anyio.Path(directory).glob(pattern)])


async def _gone(directory: Path, pattern: str) -> bool:
    return not await _exists(directory, pattern)


async def test_partial_files_of_a_killed_process_are_swept_while_running(
    server: LiveServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    await new_session(client)  # the server is up and its blobs are open
    partial = tmp_path / "data" / "files" / ".partial"
    stale = partial / "file_killedmidway.part"
    stale.write_bytes(b"half an upload")
    an_hour_ago = time.time() - 3600 + 5  # younger than the start-up sweep's hour
    os.utime(stale, (an_hour_ago, an_hour_ago))
    await eventually(lambda: _gone(partial, stale.name), within=15)  # body timeout 1 s: swept after 2 s untouched


@pytest.mark.parametrize("path", ["/api/v1/files", "/api/v1/chat", "/api/v1/sessions"])
async def test_a_client_leaving_mid_body_is_one_quiet_line(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, path: str
) -> None:
    log = tmp_path / "server.log"
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}, log=log).start()
    content_type = "application/json" if path.endswith("sessions") else MULTIPART
    head = request_head(path, content_type, length=60_000)
    status, _ = await raw_exchange(
        server.url, head, [b'{"agent": "' if "sessions" in path else part("a", b"b")], close=True
    )
    assert status is None
    await eventually(lambda: _logged(log, "disconnected"), within=10)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
    assert len([line for line in text.splitlines() if "disconnected" in line]) == 1, text


async def _logged(log: Path, needle: str) -> bool:
    return await anyio.Path(log).exists() and needle in await anyio.Path(log).read_text()


LONE_SURROGATE_BODIES = [
    b'{"ui_session_id": "S", "message": "hi \\ud800"}',
    b'{"ui_session_id": "S", "message": "hi \xed\xa0\x80"}',
    b'{"ui_session_id": "\\ud800", "message": "hi"}',
    b'{"ui_session_id": "S", "message": "hi", "file_ids": ["\\ud800"]}',
    b'{"ui_session_id": "S", "message": "hi", "file_ids": "[\\"\\\\ud800\\"]"}',
    b'{"id": "S", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi \\ud800"}]}]}',
    b'{"id": "S", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi \xed\xa0\x80"}]}]}',
    b'{"id": "\xed\xa0\x80", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}',
]


@pytest.mark.parametrize("body", LONE_SURROGATE_BODIES)
async def test_a_lone_surrogate_in_a_chat_is_a_400_without_a_traceback(
    client: httpx.AsyncClient, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = await new_session(client)
    body = body.replace(b'"S"', f'"{session_id}"'.encode())
    with caplog.at_level(logging.INFO):
        answer = await client.post("/api/v1/chat", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "Unicode" in answer.json()["message"] or "JSON" in answer.json()["message"]
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert (await messages(client, session_id)) == []


@pytest.mark.parametrize("digit", ["\u00b2", "\u00b9", "\u00b3"])
async def test_a_last_event_id_with_a_digit_int_refuses_is_taken_as_absent(
    live: Callable[..., LiveServer], digit: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = live(echo_delay=0.05)
    async with server.client() as client:
        session_id = await new_session(client)
        data = {"ui_session_id": session_id, "message": "one two three four five six"}
        async with client.stream("POST", "/api/v1/chat", data=data, headers={"accept": "text/event-stream"}) as reply:
            interaction_id = reply.headers["x-interaction-id"]
            # Sent as Latin-1, the header's own encoding: its value is '<id>:²', which isdigit() accepts.
            last = f"{interaction_id}:{digit}".encode("latin-1")
            with caplog.at_level(logging.INFO):
                rejoined = await client.get(f"/api/v1/chat/{session_id}/stream", headers={b"last-event-id": last})
            original = (await reply.aread()).decode()
    assert rejoined.status_code == 200, rejoined.text
    assert rejoined.text == original  # a full replay, as without the header
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


async def test_a_body_of_a_million_objects_does_not_stall_the_other_streams(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    # About 1.4 M "{}" in an AI SDK body, under the JSON limit: parsed on the event loop they took ~400 ms, and
    # every stream of the process stood still as long.
    crowd = ",".join(["{}"] * 1_400_000)
    head = '{"id": "ses_none", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}], "x": ['
    body = (head + crowd + "]}]}").encode()
    started = time.perf_counter()
    json.loads(body)
    parse = time.perf_counter() - started  # how long the stall was, on this machine now
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.005"}).start()
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        # The stream goes on while the body is read and refused: its longest gap then is far below the stall that
        # parsing on the loop caused (about the body's parse time, at every try). A loaded machine can pause the
        # server for as long once in a while (CI saw a 116 ms gap against a 172 ms parse, where a quiet run sees
        # 11 ms): up to three tries, of which one must show no stall.
        for _ in range(3):
            during, answer = await _gap_in_a_stream_while_posting(client, body)
            assert answer.status_code == 413, answer.text
            assert "objects and arrays" in answer.json()["message"]
            gaps.append(during)
            if during < parse / 2:
                break
    assert min(gaps) < parse / 2, (gaps, parse)


async def _gap_in_a_stream_while_posting(client: httpx.AsyncClient, body: bytes) -> tuple[float, httpx.Response]:
    """The longest gap between two pieces of a streaming reply while ``body`` is posted as a JSON chat."""
    session_id = await new_session(client)
    data = {"ui_session_id": session_id, "message": " ".join(["w"] * 5000)}
    arrivals: list[float] = []
    async with anyio.create_task_group() as tg, client.stream("POST", "/api/v1/chat", data=data) as reply:

        async def read() -> None:
            async for _ in reply.aiter_raw():
                arrivals.append(time.perf_counter())

        tg.start_soon(read)
        await eventually(lambda: _true(len(arrivals) >= 50))
        sent = time.perf_counter()
        answer = await client.post("/api/v1/chat", content=body, headers={"content-type": "application/json"})
        answered = time.perf_counter()
        count = len(arrivals)
        await eventually(lambda: _true(len(arrivals) >= count + 20))  # (the gap that spans the answer counts)
        tg.cancel_scope.cancel()
    return max(b - a for a, b in itertools.pairwise(arrivals) if b >= sent and a <= answered), answer


async def _true(value: bool) -> bool:
    return value
