"""The JSON endpoints and every 4xx of the API, with its JSON shape."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, messages, new_session

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(live: Callable[..., LiveServer]) -> AsyncIterator[httpx.AsyncClient]:
    async with live(max_message_bytes=1000).client() as client:
        yield client


def assert_error(response: httpx.Response, status_code: int, contains: str = "") -> None:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "message"}
    assert body["status"] == "error"
    assert contains in body["message"]
    assert "Traceback" not in body["message"]


async def test_healthz_and_agents(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    agents = (await client.get("/api/v1/agents")).json()["agents"]
    assert agents[0]["name"] == "echo"
    assert agents[0]["description"]


async def test_create_session_with_defaults(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/sessions")
    assert response.status_code == 201
    body = response.json()
    assert re.fullmatch(r"ses_[0-9a-f]{32}", body["ui_session_id"])
    assert body["agent"] == "echo"
    assert body["created_at"].endswith("Z")


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_create_session_with_a_chosen_id(client: httpx.AsyncClient, encoding: str) -> None:
    fields = {"ui_session_id": "host-42_a", "agent": "echo"}
    kwargs: dict[str, Any] = {"json": fields} if encoding == "json" else {"data": fields}
    response = await client.post("/api/v1/sessions", **kwargs)
    assert response.status_code == 201
    assert response.json()["ui_session_id"] == "host-42_a"
    assert_error(await client.post("/api/v1/sessions", **kwargs), 409, "host-42_a")


@pytest.mark.parametrize(
    ("body", "status_code", "contains"),
    [
        ({"agent": "nobody"}, 400, "Unknown agent"),
        ({"ui_session_id": "has space"}, 400, "ui_session_id"),
        ({"ui_session_id": "x" * 129}, 400, "ui_session_id"),
        ({"ui_session_id": 7}, 400, "ui_session_id"),
    ],
)
async def test_create_session_rejects(
    client: httpx.AsyncClient, body: dict[str, Any], status_code: int, contains: str
) -> None:
    assert_error(await client.post("/api/v1/sessions", json=body), status_code, contains)


async def test_create_session_rejects_a_broken_body(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    assert_error(await client.post("/api/v1/sessions", content=b"{nope", headers=headers), 400, "JSON")
    assert_error(await client.post("/api/v1/sessions", content=b"[1]", headers=headers), 400, "object")
    assert_error(await client.post("/api/v1/sessions", content=b"??", headers={"content-type": "text/plain"}), 400)


async def test_list_get_and_delete_sessions(client: httpx.AsyncClient) -> None:
    ids = [await new_session(client) for _ in range(3)]
    listed = (await client.get("/api/v1/sessions")).json()["sessions"]
    assert [s["ui_session_id"] for s in listed] == ids[::-1]  # newest first
    page = (await client.get("/api/v1/sessions", params={"limit": 1, "offset": 1})).json()["sessions"]
    assert [s["ui_session_id"] for s in page] == [ids[1]]
    one = (await client.get(f"/api/v1/sessions/{ids[0]}")).json()
    assert one["status"] == "idle"
    assert one["agent"] == "echo"
    deleted = await client.delete(f"/api/v1/sessions/{ids[0]}")
    assert deleted.status_code == 200
    assert deleted.json()["status"] == "success"
    assert_error(await client.get(f"/api/v1/sessions/{ids[0]}"), 404, ids[0])
    assert_error(await client.delete(f"/api/v1/sessions/{ids[0]}"), 404)
    assert_error(await client.get(f"/api/v1/sessions/{ids[0]}/messages"), 404)


@pytest.mark.parametrize("params", [{"limit": "x"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}])
async def test_list_sessions_rejects_bad_paging(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    assert_error(await client.get("/api/v1/sessions", params=params), 400)


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/nothing"), 404)
    assert_error(await client.put("/api/v1/chat"), 405)


@pytest.mark.parametrize(
    ("fields", "status_code", "contains"),
    [
        ({"message": "hi"}, 400, "ui_session_id"),
        ({"ui_session_id": "SESSION", "message": ""}, 400, "message"),
        ({"ui_session_id": "SESSION", "message": "   "}, 400, "message"),
        ({"ui_session_id": "SESSION"}, 400, "message"),
        ({"ui_session_id": "", "message": "hi"}, 400, "ui_session_id"),
        ({"ui_session_id": "SESSION", "message": "hi", "file_ids": "not json"}, 400, "file_ids"),
        ({"ui_session_id": "SESSION", "message": "hi", "file_ids": '{"a": 1}'}, 400, "file_ids"),
        ({"ui_session_id": "SESSION", "message": "hi", "file_ids": "[1, 2]"}, 400, "file_ids"),
        ({"ui_session_id": "SESSION", "message": "hi", "file_ids": '"file_1"'}, 400, "file_ids"),
        ({"ui_session_id": "SESSION", "message": "x" * 1001}, 413, "1000 bytes"),
        ({"ui_session_id": "SESSION", "message": "é" * 501}, 413, "1000 bytes"),
        ({"ui_session_id": "ses_unknown", "message": "hi"}, 404, "Session not found: ses_unknown"),
        ({"ui_session_id": "SESSION", "message": "hi", "file_ids": '["file_nope"]'}, 404, "File not found: file_nope"),
    ],
)
@pytest.mark.parametrize("encoding", ["multipart", "urlencoded"])
async def test_chat_rejects(
    client: httpx.AsyncClient, fields: dict[str, str], status_code: int, contains: str, encoding: str
) -> None:
    session_id = await new_session(client)
    fields = {k: v.replace("SESSION", session_id) for k, v in fields.items()}
    if encoding == "multipart":
        files = {k: (None, v) for k, v in fields.items()}
        response = await client.post("/api/v1/chat", files=files)
    else:
        response = await client.post("/api/v1/chat", data=fields)
    assert_error(response, status_code, contains)
    assert await messages(client, session_id) == []  # a rejected request records nothing


async def test_chat_accepts_an_empty_file_ids_list(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    fields = {"ui_session_id": session_id, "message": "hi", "file_ids": "[]"}
    response = await client.post("/api/v1/chat", data=fields)
    assert response.text == "hi"


async def test_chat_rejects_bodies_that_are_not_forms_or_json(client: httpx.AsyncClient) -> None:
    # (JSON bodies are welcome since issue 11: see tests/test_chat_sse.py.)
    session_id = await new_session(client)
    text = {"content-type": "text/plain"}
    assert_error(await client.post("/api/v1/chat", content=b"ui_session_id=x&message=hi", headers=text), 400, "form")
    garbage = {"content-type": "multipart/form-data; boundary=xyz"}
    assert_error(await client.post("/api/v1/chat", content=b"garbage", headers=garbage), 400, "could not be parsed")
    no_boundary = {"content-type": "multipart/form-data"}
    assert_error(await client.post("/api/v1/chat", content=b"garbage", headers=no_boundary), 400)
    upload = {"ui_session_id": (None, session_id), "message": ("a.txt", b"file instead of text")}
    assert_error(await client.post("/api/v1/chat", files=upload), 400)
    assert await messages(client, session_id) == []


async def test_cancel_rejects(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/api/v1/cancel", data={}), 400, "ui_session_id")
    assert_error(await client.post("/api/v1/cancel", data={"ui_session_id": "ses_unknown"}), 404, "ses_unknown")
    assert_error(await client.post("/api/v1/cancel", content=b"", headers={"content-type": "text/plain"}), 400)


async def test_urlencoded_text_is_read_as_utf8_raw_or_escaped(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    headers = {"content-type": "application/x-www-form-urlencoded"}
    raw = f"ui_session_id={session_id}&message=caf\u00e9+%E2%9C%93".encode()
    response = await client.post("/api/v1/chat", content=raw, headers=headers)
    assert response.text == "caf\u00e9 \u2713"
    fields = "&".join(["a="] * 1001)
    assert_error(await client.post("/api/v1/chat", content=fields.encode(), headers=headers), 400, "too many")


async def test_urlencoded_fields_are_read_as_parse_qsl_reads_them(client: httpx.AsyncClient) -> None:
    # (parley splits an urlencoded body by hand: what the standard library's parser makes of it must not change.)
    session_id = await new_session(client)
    headers = {"content-type": "application/x-www-form-urlencoded"}
    raw = f"&&flag&message=first&ui_session_id={session_id}&message=a%2Bb+c%3D%ZZ=d&=x&".encode()
    response = await client.post("/api/v1/chat", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    assert response.text == "a+b c=%ZZ=d"  # the last of a repeated name; '+' a space; '%ZZ' as it is
