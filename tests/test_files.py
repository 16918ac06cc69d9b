"""Files: upload, list, fetch, delete, hostile names, other sessions' files, and their use in chat."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from parley.agents import Agents, Turn
from parley.app import create_app
from tests.conftest import LiveServer, Subprocess, eventually, make_settings, messages, new_session

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(live: Callable[..., LiveServer]) -> LiveServer:
    return live(max_upload_bytes=4096)


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as client:
        yield client


def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "files"


def blobs_on_disk(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in files_dir(tmp_path).rglob("*") if p.is_file())


async def upload(
    client: httpx.AsyncClient, session_id: str, content: bytes, filename: str = "notes.txt", mime: str = "text/plain"
) -> httpx.Response:
    return await client.post(
        "/api/v1/files", data={"ui_session_id": session_id}, files={"file": (filename, content, mime)}
    )


def raw_multipart(session_id: str, filename: bytes, content: bytes) -> tuple[bytes, str]:
    """A multipart body written by hand, so a filename reaches the server byte for byte."""
    boundary = "parleyboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="ui_session_id"\r\n\r\n{session_id}\r\n'
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: text/plain\r\n\r\n'
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def test_upload_list_get_content_delete(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id = await new_session(client)
    content = b"hello, file\n"
    created = await upload(client, session_id, content)
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["id"].startswith("file_") and len(info["id"]) == 37
    assert (info["filename"], info["mime_type"], info["size"]) == ("notes.txt", "text/plain", len(content))
    assert info["sha256"] == hashlib.sha256(content).hexdigest()
    assert blobs_on_disk(tmp_path) == [info["id"]]  # named by id, never by the client's filename

    listed = (await client.get(f"/api/v1/files/{session_id}")).json()["files"]
    assert listed == [info]
    assert (await client.get(f"/api/v1/files/{session_id}/{info['id']}")).json() == info

    fetched = await client.get(f"/api/v1/files/{session_id}/{info['id']}/content")
    assert fetched.content == content
    assert fetched.headers["content-type"].startswith("text/plain")
    assert fetched.headers["content-disposition"] == "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt"
    assert fetched.headers["x-content-type-options"] == "nosniff"

    deleted = await client.delete(f"/api/v1/files/{session_id}/{info['id']}")
    assert deleted.json() == {"status": "success", "message": "File notes.txt deleted"}
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []
    assert (await client.get(f"/api/v1/files/{session_id}/{info['id']}")).status_code == 404
    assert blobs_on_disk(tmp_path) == []


async def test_mime_type_is_guessed_when_not_declared(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    created = await upload(client, session_id, b"{}", filename="data.json", mime="application/octet-stream")
    assert created.json()["mime_type"] == "application/json"


async def test_an_oversize_upload_is_refused_and_leaves_nothing(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id = await new_session(client)
    response = await upload(client, session_id, b"x" * 4097)
    assert response.status_code == 413
    assert response.json()["status"] == "error"
    assert blobs_on_disk(tmp_path) == []
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []
    exactly = await upload(client, session_id, b"x" * 4096)
    assert exactly.status_code == 201


async def test_upload_rejects(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id = await new_session(client)
    unknown = await upload(client, "ses_unknown", b"data")
    assert unknown.status_code == 404
    assert unknown.json()["message"] == "Session not found: ses_unknown"
    no_file = await client.post("/api/v1/files", files={"ui_session_id": (None, session_id)})
    assert no_file.status_code == 400
    assert "file" in no_file.json()["message"]
    no_session = await client.post("/api/v1/files", files={"file": ("a.txt", b"data", "text/plain")})
    assert no_session.status_code == 400
    not_multipart = await client.post("/api/v1/files", data={"ui_session_id": session_id})
    assert not_multipart.status_code == 400
    broken = await client.post(
        "/api/v1/files", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert broken.status_code == 400
    assert blobs_on_disk(tmp_path) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"../../etc/passwd", "passwd"),
        (b"..\\..\\windows\\system32\\evil.dll", "evil.dll"),
        (b"nul\x00byte.txt", "nulbyte.txt"),
        (b"tab\tescape\x1bdel\x7f.txt", "tabescapedel.txt"),
        (b"x" * 10_000 + b".txt", "x" * 251 + ".txt"),
        (b"", "file"),
        (b"..", "file"),
        ("r\u00e9sum\u00e9 \u2713.txt".encode(), "r\u00e9sum\u00e9 \u2713.txt"),
    ],
)
async def test_hostile_filenames_are_made_safe(
    client: httpx.AsyncClient, tmp_path: Path, raw: bytes, expected: str
) -> None:
    session_id = await new_session(client)
    body, content_type = raw_multipart(session_id, raw, b"payload")
    response = await client.post("/api/v1/files", content=body, headers={"content-type": content_type})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["filename"] == expected
    assert blobs_on_disk(tmp_path) == [info["id"]]
    fetched = await client.get(f"/api/v1/files/{session_id}/{info['id']}/content")
    disposition = fetched.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="')
    assert "\n" not in disposition and "/" not in disposition.split(";")[1]


async def test_a_filename_that_breaks_the_header_line_is_a_400(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id = await new_session(client)
    body, content_type = raw_multipart(session_id, b"new\r\nline.txt", b"payload")
    response = await client.post("/api/v1/files", content=body, headers={"content-type": content_type})
    assert response.status_code == 400
    assert blobs_on_disk(tmp_path) == []


async def test_another_sessions_file_is_refused_everywhere(client: httpx.AsyncClient, tmp_path: Path) -> None:
    owner, intruder = await new_session(client), await new_session(client)
    file_id = (await upload(client, owner, b"secret")).json()["id"]
    for response in [
        await client.get(f"/api/v1/files/{intruder}/{file_id}"),
        await client.get(f"/api/v1/files/{intruder}/{file_id}/content"),
        await client.delete(f"/api/v1/files/{intruder}/{file_id}"),
        await client.post(
            "/api/v1/chat", data={"ui_session_id": intruder, "message": "hi", "file_ids": f'["{file_id}"]'}
        ),
    ]:
        assert response.status_code == 404
        assert response.json() == {"status": "error", "message": f"File not found: {file_id}"}
    assert (await client.get(f"/api/v1/files/{intruder}")).json()["files"] == []
    assert blobs_on_disk(tmp_path) == [file_id]  # still there for its owner
    assert (await client.get(f"/api/v1/files/{owner}/{file_id}/content")).content == b"secret"


async def test_chat_with_files(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    text = (await upload(client, session_id, b"some notes")).json()
    image = (await upload(client, session_id, b"\x89PNG....", filename="pic.png", mime="image/png")).json()
    file_ids = f'["{text["id"]}", "{image["id"]}"]'
    reply = await client.post(
        "/api/v1/chat", data={"ui_session_id": session_id, "message": "look", "file_ids": file_ids}
    )
    assert reply.text == "look\n[file: notes.txt, 10 bytes]\n[file: pic.png, 8 bytes]"
    history = await messages(client, session_id)
    assert history[0]["file_ids"] == [text["id"], image["id"]]
    assert history[1]["content"] == reply.text


async def test_a_file_deleted_before_the_chat_is_not_found(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    file_id = (await upload(client, session_id, b"gone soon")).json()["id"]
    await client.delete(f"/api/v1/files/{session_id}/{file_id}")
    response = await client.post(
        "/api/v1/chat", data={"ui_session_id": session_id, "message": "hi", "file_ids": f'["{file_id}"]'}
    )
    assert response.status_code == 404
    assert response.json()["message"] == f"File not found: {file_id}"
    assert await messages(client, session_id) == []


async def test_deleting_a_session_deletes_its_files(client: httpx.AsyncClient, tmp_path: Path) -> None:
    session_id, other = await new_session(client), await new_session(client)
    await upload(client, session_id, b"one")
    await upload(client, session_id, b"two")
    kept = (await upload(client, other, b"three")).json()["id"]
    await client.delete(f"/api/v1/sessions/{session_id}")
    assert blobs_on_disk(tmp_path) == [kept]


async def test_an_upload_cut_off_midway_leaves_nothing(
    server: LiveServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    session_id = await new_session(client)
    body, content_type = raw_multipart(session_id, b"half.txt", b"y" * 3000)
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        head = (
            f"POST /api/v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:2000])

        async def partial_written() -> bool:
            return any(files_dir(tmp_path).glob(".partial/*"))

        await eventually(partial_written)
    # The connection is gone before the body was whole: the partial blob goes with it.
    await eventually(lambda: _no_blobs(tmp_path))
    assert (await client.get(f"/api/v1/files/{session_id}")).json()["files"] == []


async def _no_blobs(tmp_path: Path) -> bool:
    return blobs_on_disk(tmp_path) == []


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_stays_flat_while_uploading_near_the_limit(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    server = subprocesses({"PARLEY_DATA_DIR": str(tmp_path / "data")}).start()
    assert server.process is not None
    session_id = httpx.post(f"{server.url}/api/v1/sessions").json()["ui_session_id"]
    httpx.post(f"{server.url}/api/v1/files", data={"ui_session_id": session_id}, files={"file": ("w", b"warm")})
    before = _peak_rss_kib(server.process.pid)
    size = 10 * 1024 * 1024 - 1024
    body_head, content_type = raw_multipart(session_id, b"big.bin", b"")
    head, tail = body_head.split(b"\r\n\r\n\r\n")[0] + b"\r\n\r\n", b"\r\n--parleyboundary--\r\n"

    def body() -> Iterator[bytes]:
        yield head
        chunk = b"z" * 65536
        for _ in range(size // len(chunk)):
            yield chunk
        yield b"z" * (size % len(chunk))
        yield tail

    response = httpx.post(
        f"{server.url}/api/v1/files",
        content=body(),
        headers={"content-type": content_type, "content-length": str(len(head) + size + len(tail))},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert response.json()["size"] == size
    growth_kib = _peak_rss_kib(server.process.pid) - before
    assert growth_kib < 4 * 1024, f"peak RSS grew by {growth_kib} KiB for a {size // 1024} KiB upload"


class RecordingAgent:
    name = "recording"
    description = "test agent"
    history_limit = 0

    def __init__(self) -> None:
        self.turns: list[Turn] = []

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        self.turns.append(turn)
        yield "ok"


async def test_text_files_reach_the_agent_as_text(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    agent = RecordingAgent()
    server = serve(create_app(make_settings(tmp_path, agent="recording"), agents=Agents([agent])))
    async with server.client() as client:
        session_id = await new_session(client)
        notes = (await upload(client, session_id, "caf\u00e9 \xff".encode("latin-1"), filename="n.md")).json()
        code = (await upload(client, session_id, b"print(1)", filename="x.py", mime="")).json()
        image = (await upload(client, session_id, b"\x89PNG", filename="p.png", mime="image/png")).json()
        file_ids = f'["{notes["id"]}", "{code["id"]}", "{image["id"]}"]'
        await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "m", "file_ids": file_ids})
    (turn,) = agent.turns
    assert [(f.filename, f.mime_type, f.size, f.text) for f in turn.files] == [
        ("n.md", "text/plain", 6, "caf\ufffd \ufffd"),
        ("x.py", "text/x-python", 8, "print(1)"),
        ("p.png", "image/png", 4, None),
    ]


async def test_a_blob_left_without_its_record_by_a_killed_process_is_swept(
    live: Callable[..., LiveServer], tmp_path: Path
) -> None:
    # What a kill -9 between an upload's move into place and its record leaves (one blob, and the note naming its
    # session that the upload wrote before the move); and what one between the record and the note's removal
    # leaves (a recorded blob with its note). The sweep runs every PARLEY_BODY_TIMEOUT_SECONDS (here 1 s) and
    # takes what is older than twice that.
    server = live(body_timeout_seconds=1)
    async with server.client() as client:
        session_id = await new_session(client)
        kept = (await upload(client, session_id, b"recorded")).json()["id"]
        root = files_dir(tmp_path)
        notes = root / ".unrecorded"
        notes.mkdir(exist_ok=True)
        (root / "file_orphan").write_bytes(b"no record")
        long_ago = time.time() - 60
        for name in ("file_orphan", kept):
            (notes / name).write_text(session_id)
            os.utime(notes / name, (long_ago, long_ago))
        os.utime(root / "file_orphan", (long_ago, long_ago))

        async def swept() -> bool:
            return blobs_on_disk(tmp_path) == [kept]

        await eventually(swept, within=15)
        content = await client.get(f"/api/v1/files/{session_id}/{kept}/content")
        assert (content.status_code, content.content) == (200, b"recorded")
