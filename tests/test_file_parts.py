"""The AI SDK's file parts (parley/file_parts.py): a user message's files sent in its parts, as sendMessage({text,
files}) sends them (data: URLs), become files of the session and parts of the message in history; what parley cannot
take is refused, and leaves nothing behind."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from parley.agents import Agents
from parley.app import create_app
from tests.conftest import LiveServer, make_settings, messages, new_session
from tests.test_files import RecordingAgent

pytestmark = pytest.mark.anyio

PLAIN = {"accept": "text/plain"}
NOTES = b"# notes\nsome words\n"
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def data_url(content: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(content).decode()}"


def file_part(filename: str, media_type: str, url: str) -> dict[str, Any]:
    return {"type": "file", "mediaType": media_type, "filename": filename, "url": url}


def body(
    session_id: str, text: str, files: list[dict[str, Any]], message_id: str = "u1", **extra: Any
) -> dict[str, Any]:
    """The AI SDK's body for sendMessage({text, files}): the file parts, then the text."""
    parts = [*files, {"type": "text", "text": text}]
    return {"id": session_id, "messages": [{"id": message_id, "role": "user", "parts": parts}], **extra}


async def session_files(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/files/{session_id}")
    assert response.status_code == 200, response.text
    return list(response.json()["files"])


async def test_file_parts_become_the_sessions_files_reach_the_agent_and_come_back_in_history(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path
) -> None:
    agent = RecordingAgent()
    server = serve(create_app(make_settings(tmp_path, agent="recording"), agents=Agents([agent])))
    files = [
        file_part("notes.md", "text/markdown", data_url(NOTES, "text/markdown")),
        file_part("pixel.png", "image/png", data_url(PIXEL, "image/png")),
        file_part("plain.txt", "text/plain", "data:,hello%20there"),  # (not base64: percent-encoded, RFC 2397)
    ]
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", json=body(session_id, "look at these", files), headers=PLAIN)
        assert (response.status_code, response.text) == (200, "ok")
        history = await messages(client, session_id)
        kept = await session_files(client, session_id)
        contents = [(await client.get(part["url"])).content for part in history[0]["parts"][:3]]

    (turn,) = agent.turns
    assert [(f.filename, f.mime_type, f.size, f.text) for f in turn.files] == [
        ("notes.md", "text/markdown", len(NOTES), NOTES.decode()),
        ("pixel.png", "image/png", len(PIXEL), None),
        ("plain.txt", "text/plain", 11, "hello there"),
    ]
    assert [(f["filename"], f["mime_type"], f["size"]) for f in kept] == [
        ("notes.md", "text/markdown", len(NOTES)),
        ("pixel.png", "image/png", len(PIXEL)),
        ("plain.txt", "text/plain", 11),
    ]
    user = history[0]
    assert (user["role"], user["content"], user["file_ids"]) == ("user", "look at these", [f["id"] for f in kept])
    # The message's parts as sendMessage made them, each file's url now its bytes in parley: a reload shows them.
    assert user["parts"] == [
        *(file_part(f["filename"], f["mime_type"], f"/api/v1/files/{session_id}/{f['id']}/content") for f in kept),
        {"type": "text", "text": "look at these"},
    ]
    assert contents == [NOTES, PIXEL, b"hello there"]


async def test_the_same_file_sent_again_or_by_its_url_in_parley_names_the_file_the_session_has(
    live: Callable[..., LiveServer],
) -> None:
    server = live()
    notes = file_part("notes.md", "text/markdown", data_url(NOTES, "text/markdown"))
    async with server.client() as client:
        session_id = await new_session(client)
        first = await client.post("/api/v1/chat", json=body(session_id, "one", [notes]), headers=PLAIN)
        assert first.text == f"one\n[file: notes.md, {len(NOTES)} bytes]"
        (kept,) = await session_files(client, session_id)
        # regenerate(): the SDK sends the message again, data: URL and all.
        again = body(session_id, "one", [notes], trigger="regenerate-message")
        assert (await client.post("/api/v1/chat", json=again, headers=PLAIN)).text == first.text
        # A message that carries a file of history's (its url, as history gives it, or absolute) names that file.
        url = (await messages(client, session_id))[0]["parts"][0]["url"]
        for n, link in enumerate((url, f"{server.url}{url}")):
            named = body(session_id, "two", [file_part("notes.md", "text/markdown", link)], message_id=f"u{n + 2}")
            assert (await client.post("/api/v1/chat", json=named, headers=PLAIN)).text == first.text.replace(
                "one", "two"
            )
        history = await messages(client, session_id)
        assert await session_files(client, session_id) == [kept]
    assert [m["file_ids"] for m in history if m["role"] == "user"] == [[kept["id"]]] * 3


@pytest.mark.parametrize(
    ("part", "status", "message"),
    [
        (file_part("a.txt", "text/plain", "data:text/plain;base64,not base64!"), 400, "not valid base64"),
        (file_part("a.txt", "text/plain", "data:text/plain;base64"), 400, "has no comma"),
        (file_part("cat.png", "image/png", "https://example.com/cat.png"), 400, "parley fetches nothing"),
        (file_part("a.txt", "text/plain", "/elsewhere/cat.png"), 400, "parley fetches nothing"),
        ({"type": "file", "url": "data:,hi"}, 400, "needs a url and a mediaType"),
        (file_part("\ud800.txt", "text/plain", "data:,hi"), 400, "lone surrogate"),
        (file_part("big.bin", "application/octet-stream", data_url(b"x" * 4097, "x/y")), 413, "larger than the limit"),
        (file_part("a.txt", "text/plain", "/api/v1/files/s/file_nope/content"), 404, "File not found: file_nope"),
    ],
)
async def test_a_file_part_parley_cannot_take_is_refused_and_leaves_nothing(
    live: Callable[..., LiveServer], part: dict[str, Any], status: int, message: str
) -> None:
    server = live(max_upload_bytes=4096)
    good = file_part("notes.md", "text/markdown", data_url(NOTES, "text/markdown"))
    async with server.client() as client:
        session_id = await new_session(client)
        # (A good file before it: it must not stay either.)
        sent = json.dumps(body(session_id, "hi", [good, part]))  # (a lone surrogate as \ud800, as JSON allows)
        response = await client.post(
            "/api/v1/chat", content=sent, headers={**PLAIN, "content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert message in response.json()["message"]
        assert await messages(client, session_id) == []
        assert await session_files(client, session_id) == []


async def test_a_chat_refused_as_busy_keeps_none_of_its_files(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.05)
    words = " ".join(f"w{i}" for i in range(200))
    async with server.client() as client:
        session_id = await new_session(client)
        form = {"ui_session_id": session_id, "message": words}
        async with client.stream("POST", "/api/v1/chat", data=form) as running:
            chunks = running.aiter_text()  # (held: a reader dropped mid-reply closes the connection)
            await chunks.__anext__()  # the reply runs: the session is busy
            notes = file_part("notes.md", "text/markdown", data_url(NOTES, "text/markdown"))
            refused = await client.post("/api/v1/chat", json=body(session_id, "me too", [notes]), headers=PLAIN)
            assert refused.status_code == 409, refused.text
            assert await session_files(client, session_id) == []
            await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
        assert [m["content"] for m in await messages(client, session_id) if m["role"] == "user"] == [words]


async def test_a_message_with_files_read_from_parley_mounted_in_a_host_links_them_under_its_path(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path
) -> None:
    server = serve(Starlette(routes=[Mount("/chat", app=create_app(make_settings(tmp_path)))]))
    async with httpx.AsyncClient(base_url=f"{server.url}/chat", timeout=10) as client:
        session_id = await new_session(client)
        notes = file_part("notes.md", "text/markdown", data_url(NOTES, "text/markdown"))
        response = await client.post("/api/v1/chat", json=body(session_id, "hi", [notes]), headers=PLAIN)
        assert response.status_code == 200, response.text
        url = (await messages(client, session_id))[0]["parts"][0]["url"]
        assert url.startswith("/chat/api/v1/files/")
        assert (await client.get(f"{server.url}{url}")).content == NOTES
