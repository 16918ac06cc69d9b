"""Conversation control over HTTP: titles, regenerate and edit (replace), what a message into a busy session does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, messages, new_session

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(live: Callable[..., LiveServer]) -> AsyncIterator[httpx.AsyncClient]:
    async with live().client() as client:
        yield client


async def chat(client: httpx.AsyncClient, session_id: str, message: str, **fields: str) -> httpx.Response:
    response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": message, **fields})
    assert response.status_code == 200, response.text
    return response


def assert_error(response: httpx.Response, status_code: int, contains: str = "") -> None:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["status"] == "error" and contains in body["message"], body


# titles


async def test_a_session_is_titled_by_its_first_message_until_it_is_renamed(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["title"] is None
    await chat(client, session_id, "  How do I\n\n   reverse a list " + "in Python " * 10)
    await chat(client, session_id, "and a tuple?")
    title = "How do I reverse a list " + "in Python " * 10
    expected = title[:79].rstrip() + "…"
    one = (await client.get(f"/api/v1/sessions/{session_id}")).json()
    assert one["title"] == expected and len(expected) == 80 and one["status"] == "idle"
    listed = (await client.get("/api/v1/sessions")).json()["sessions"]
    assert [(s["ui_session_id"], s["title"]) for s in listed] == [(session_id, expected)]

    renamed = await client.patch(f"/api/v1/sessions/{session_id}", json={"title": " Lists and tuples "})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json() == {
        **{k: one[k] for k in ("ui_session_id", "agent", "created_at")},
        "title": "Lists and tuples",
    }
    assert (await client.get("/api/v1/sessions")).json()["sessions"][0]["title"] == "Lists and tuples"
    form = await client.patch(f"/api/v1/sessions/{session_id}", data={"title": "x" * 200})
    assert form.status_code == 200 and form.json()["title"] == "x" * 200
    back = await client.patch(f"/api/v1/sessions/{session_id}", json={"title": None})
    assert back.json()["title"] == expected


async def test_a_title_can_be_given_at_creation(client: httpx.AsyncClient) -> None:
    created = await client.post("/api/v1/sessions", json={"title": "Trip to Lisbon"})
    assert created.status_code == 201 and created.json()["title"] == "Trip to Lisbon"
    session_id = created.json()["ui_session_id"]
    await chat(client, session_id, "what to see?")
    assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["title"] == "Trip to Lisbon"


@pytest.mark.parametrize("title", ["", "   ", "x" * 201, 7, ["a"], False])
async def test_a_bad_title_is_a_400(client: httpx.AsyncClient, title: Any) -> None:
    session_id = await new_session(client)
    assert_error(await client.patch(f"/api/v1/sessions/{session_id}", json={"title": title}), 400, "title")
    assert_error(await client.post("/api/v1/sessions", json={"title": title}), 400, "title")
    assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["title"] is None


async def test_renaming_needs_a_title_and_a_session_of_ones_own(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    assert_error(await client.patch(f"/api/v1/sessions/{session_id}", json={}), 400, "title")
    assert_error(await client.patch("/api/v1/sessions/ses_nobody", json={"title": "hi"}), 404, "ses_nobody")
    assert (await client.get("/api/v1/sessions")).json()["sessions"][0]["title"] is None
    assert await messages(client, session_id) == []


# regenerate and edit: replace=<message id>


async def test_replace_a_reply_answers_its_question_again_in_its_place(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    for text in ("one", "two", "three"):
        await chat(client, session_id, text)
    before = await messages(client, session_id)
    response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "replace": before[3]["id"]})
    assert response.status_code == 200 and response.text == "two"
    after = await messages(client, session_id)
    assert [(m["role"], m["content"]) for m in after] == [
        ("user", "one"),
        ("assistant", "one"),
        ("user", "two"),
        ("assistant", "two"),
    ]
    assert after[:3] == before[:3] and after[3]["id"] != before[3]["id"]
    assert after[3]["interaction_id"] == response.headers["x-interaction-id"]


async def test_replace_a_user_message_is_an_edit(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    for text in ("one", "two", "three"):
        await chat(client, session_id, text)
    before = await messages(client, session_id)
    body = {"ui_session_id": session_id, "message": "two, edited", "replace": before[2]["id"]}
    response = await client.post("/api/v1/chat", json=body)
    assert response.status_code == 200 and response.text == "two, edited"
    after = await messages(client, session_id)
    assert [(m["role"], m["content"]) for m in after] == [
        ("user", "one"),
        ("assistant", "one"),
        ("user", "two, edited"),
        ("assistant", "two, edited"),
    ]
    assert after[:2] == before[:2]
    # An edit needs the new text; an unknown message is a 404; neither changes anything.
    no_text = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "replace": after[2]["id"]})
    assert_error(no_text, 400, "new text")
    unknown = await client.post(
        "/api/v1/chat", data={"ui_session_id": session_id, "replace": "msg_nope", "message": "x"}
    )
    assert_error(unknown, 404, "Message not found: msg_nope")
    assert_error(await client.post("/api/v1/chat", json={**body, "replace": 7}), 400, "replace")
    assert await messages(client, session_id) == after


async def test_a_replace_refused_as_busy_drops_nothing(live: Callable[..., LiveServer]) -> None:
    async with live(echo_delay=0.05).client() as client:
        session_id = await new_session(client)
        await chat(client, session_id, "one")
        form = {"ui_session_id": session_id, "message": " ".join(f"w{i}" for i in range(100))}
        async with client.stream("POST", "/api/v1/chat", data=form) as running:
            assert running.status_code == 200
            chunks = running.aiter_text()  # (kept: a dropped iterator closes the response)
            await anext(chunks)
            before = await messages(client, session_id)
            first_reply = before[1]["id"]
            busy = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "replace": first_reply})
            assert_error(busy, 409, "in progress")
            assert [m["id"] for m in await messages(client, session_id)] == [m["id"] for m in before]
            await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
