"""Conversation control over HTTP: titles, regenerate and edit (replace), what a message into a busy session does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from tests.conftest import (
    LiveServer,
    RedisServer,
    Subprocess,
    eventually,
    messages,
    new_session,
    pair,
    start_together,
)

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


# if_busy: what a message into a session with a reply in progress does


LONG = " ".join(f"w{i}" for i in range(100))  # five seconds at 50 ms a word


class Running:
    """A reply in progress (plain text), read a little so that it has surely started."""

    def __init__(self, client: httpx.AsyncClient, session_id: str, message: str = LONG) -> None:
        self.client, self.session_id, self.message = client, session_id, message
        self.text = ""

    async def __aenter__(self) -> Running:
        form = {"ui_session_id": self.session_id, "message": self.message}
        self._stream = self.client.stream("POST", "/api/v1/chat", data=form)
        self.response = await self._stream.__aenter__()
        assert self.response.status_code == 200
        self.chunks = self.response.aiter_text()  # (kept: a dropped iterator closes the response)
        self.text = await anext(self.chunks)
        return self

    async def rest(self) -> str:
        async for chunk in self.chunks:
            self.text += chunk
        return self.text

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stream.__aexit__(None, None, None)


async def state(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    return dict((await client.get(f"/api/v1/sessions/{session_id}")).json())


async def test_interrupt_stops_the_running_reply_as_a_cancel_does_then_answers(live: Callable[..., LiveServer]) -> None:
    async with live(echo_delay=0.05).client() as client:
        session_id = await new_session(client)
        async with Running(client, session_id) as running:
            response = await client.post(
                "/api/v1/chat", data={"ui_session_id": session_id, "message": "now this", "if_busy": "interrupt"}
            )
            stopped = await running.rest()
        history = await messages(client, session_id)
    assert response.status_code == 200 and response.text == "now this"
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    # The stopped reply's stream ended as a cancelled one does, with exactly the text history keeps.
    assert history[1]["content"] == stopped and LONG.startswith(stopped) and stopped != LONG
    assert history[3]["interaction_id"] == response.headers["x-interaction-id"]


async def test_enqueue_waits_for_the_running_reply_then_runs_first_come_first_served(
    live: Callable[..., LiveServer],
) -> None:
    async with live(echo_delay=0.01).client() as client:
        session_id = await new_session(client)
        answers: dict[str, httpx.Response] = {}

        async def send(text: str) -> None:
            form = {"ui_session_id": session_id, "message": text, "if_busy": "enqueue"}
            answers[text] = await client.post("/api/v1/chat", data=form)

        async with Running(client, session_id) as running, anyio.create_task_group() as tg:
            for count, text in enumerate(("second", "third"), start=1):
                tg.start_soon(send, text)
                await eventually(lambda count=count: _queued(client, session_id, count))  # type: ignore[misc]
            listed = await state(client, session_id)
            assert listed["status"] == "streaming" and listed["queued"] == 2
            assert len(listed["queued_interactions"]) == 2
            # Nothing of a waiting message is recorded.
            assert [m["content"] for m in await messages(client, session_id) if m["role"] == "user"] == [LONG]
            whole = await running.rest()
        history = await messages(client, session_id)
    assert whole == LONG
    assert answers["second"].text == "second" and answers["third"].text == "third"
    assert [(m["role"], m["content"], m["status"]) for m in history][2:] == [
        ("user", "second", "complete"),
        ("assistant", "second", "complete"),
        ("user", "third", "complete"),
        ("assistant", "third", "complete"),
    ]


async def _queued(client: httpx.AsyncClient, session_id: str, count: int) -> bool:
    return bool((await state(client, session_id))["queued"] == count)


async def test_a_full_line_is_a_429_and_a_cancel_takes_a_waiting_message_out_of_it(
    live: Callable[..., LiveServer],
) -> None:
    async with live(echo_delay=0.05, max_queued=1).client() as client:
        session_id = await new_session(client)
        answers: list[httpx.Response] = []

        async def send(text: str) -> None:
            form = {"ui_session_id": session_id, "message": text}
            answers.append(await client.post("/api/v1/chat", data=form, params={"if_busy": "enqueue"}))

        async with Running(client, session_id), anyio.create_task_group() as tg:
            tg.start_soon(send, "waits")
            await eventually(lambda: _queued(client, session_id, 1))
            full = await client.post(
                "/api/v1/chat", json={"ui_session_id": session_id, "message": "x", "if_busy": "enqueue"}
            )
            assert_error(full, 429, "wait for this session")
            assert full.headers["retry-after"] == "1"
            (waiting,) = (await state(client, session_id))["queued_interactions"]
            cancel = await client.post("/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": waiting})
            assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
            await eventually(lambda: _queued(client, session_id, 0))
            assert (await state(client, session_id))["status"] == "streaming"  # the running reply goes on
            await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
        history = await messages(client, session_id)
    assert_error(answers[0], 409, "cancelled while it waited")
    assert [m["content"] for m in history if m["role"] == "user"] == [LONG]


async def test_a_waiting_message_whose_client_leaves_is_dropped(live: Callable[..., LiveServer]) -> None:
    async with live(echo_delay=0.01).client() as client:
        session_id = await new_session(client)
        async with Running(client, session_id) as running:
            form = {"ui_session_id": session_id, "message": "gone", "if_busy": "enqueue", "on_disconnect": "continue"}
            with anyio.move_on_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: client.post("/api/v1/chat", data=form))
                    await eventually(lambda: _queued(client, session_id, 1))
                    tg.cancel_scope.cancel()  # the client goes away (its connection closes)
            await eventually(lambda: _queued(client, session_id, 0))
            assert await running.rest() == LONG
        await eventually(lambda: _idle(client, session_id))
        history = await messages(client, session_id)
    assert [(m["role"], m["content"]) for m in history] == [("user", LONG), ("assistant", LONG)]


async def test_deleting_a_session_ends_its_waiting_messages_with_404(live: Callable[..., LiveServer]) -> None:
    async with live(echo_delay=0.05).client() as client:
        session_id = await new_session(client)
        answers: list[httpx.Response] = []

        async def send() -> None:
            form = {"ui_session_id": session_id, "message": "later", "if_busy": "enqueue"}
            answers.append(await client.post("/api/v1/chat", data=form))

        async with Running(client, session_id), anyio.create_task_group() as tg:
            tg.start_soon(send)
            await eventually(lambda: _queued(client, session_id, 1))
            assert (await client.delete(f"/api/v1/sessions/{session_id}")).status_code == 200
    assert_error(answers[0], 404, session_id)


async def test_the_servers_default_and_the_stream_limit_count_a_waiting_message_once_it_runs(
    live: Callable[..., LiveServer],
) -> None:
    async with live(echo_delay=0.01, if_busy="enqueue", max_streams_per_owner=1).client() as client:
        session_id = await new_session(client)
        answers: list[httpx.Response] = []

        async def send() -> None:
            answers.append(await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "next"}))

        async with Running(client, session_id) as running, anyio.create_task_group() as tg:
            tg.start_soon(send)  # PARLEY_IF_BUSY=enqueue: it waits, without a stream slot while it does
            await eventually(lambda: _queued(client, session_id, 1))
            await running.rest()
    assert answers[0].status_code == 200 and answers[0].text == "next"


@pytest.mark.parametrize("where", ["form", "json", "query"])
async def test_an_unknown_if_busy_is_a_400(client: httpx.AsyncClient, where: str) -> None:
    session_id = await new_session(client)
    fields = {"ui_session_id": session_id, "message": "hi"}
    if where == "form":
        response = await client.post("/api/v1/chat", data={**fields, "if_busy": "rollback"})
    elif where == "json":
        response = await client.post("/api/v1/chat", json={**fields, "if_busy": 3})
    else:
        response = await client.post("/api/v1/chat", data=fields, params={"if_busy": "later"})
    assert_error(response, 400, "if_busy")
    assert await messages(client, session_id) == []


async def _idle(client: httpx.AsyncClient, session_id: str) -> bool:
    return bool((await state(client, session_id))["status"] == "idle")


# if_busy across two workers on Redis


@asynccontextmanager
async def two_workers(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer, **env: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, str]]:
    """Two workers on one Redis with slow echoes (a reply runs long enough to queue behind), a client on each, and
    a new session (made on the first)."""
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_ECHO_DELAY="0.02", **env)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=20) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=20) as on_b,
    ):
        yield on_a, on_b, await new_session(on_a)


@pytest.mark.redis
async def test_across_workers_interrupt_and_enqueue_reach_a_reply_another_worker_runs(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server) as (on_a, on_b, session_id):
        # interrupt, sent to b, stops the reply that a runs (recorded cancelled), then runs on b.
        async with Running(on_a, session_id) as running:
            form = {"ui_session_id": session_id, "message": "from b", "if_busy": "interrupt"}
            interrupting = await on_b.post("/api/v1/chat", data=form)
            stopped = await running.rest()
        assert interrupting.status_code == 200 and interrupting.text == "from b"
        history = await messages(on_b, session_id)
        assert [(m["role"], m["status"]) for m in history] == [
            ("user", "complete"),
            ("assistant", "cancelled"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert history[1]["content"] == stopped and stopped != LONG

        # enqueue, sent to b, waits for the reply that a runs to end, then runs on b.
        answers: list[httpx.Response] = []

        async def enqueue(client: httpx.AsyncClient, text: str) -> None:
            form = {"ui_session_id": session_id, "message": text, "if_busy": "enqueue"}
            answers.append(await client.post("/api/v1/chat", data=form))

        async with Running(on_a, session_id) as running, anyio.create_task_group() as tg:
            tg.start_soon(enqueue, on_b, "after a")
            await eventually(lambda: _queued(on_b, session_id, 1))
            assert await running.rest() == LONG
        assert answers[0].status_code == 200 and answers[0].text == "after a"
        assert [m["content"] for m in await messages(on_a, session_id)][-4:] == [LONG, LONG, "after a", "after a"]


@pytest.mark.redis
async def test_a_worker_killed_with_a_queue_loses_only_its_own_waiting_messages(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_ECHO_DELAY="0.02")
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=20) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=20) as on_b,
    ):
        session_id = await new_session(on_a)
        outcomes: dict[str, object] = {}

        async def enqueue(client: httpx.AsyncClient, text: str) -> None:
            form = {"ui_session_id": session_id, "message": text, "if_busy": "enqueue"}
            try:
                outcomes[text] = (await client.post("/api/v1/chat", data=form)).text
            except httpx.HTTPError as exc:
                outcomes[text] = exc

        async with Running(on_a, session_id) as running, anyio.create_task_group() as tg:
            tg.start_soon(enqueue, on_b, "lost with b")
            await eventually(lambda: _queued(on_b, session_id, 1))
            tg.start_soon(enqueue, on_a, "waits on a")
            await eventually(lambda: _queued(on_a, session_id, 2))  # (one line for the session, on every worker)
            b.stop(kill=True)  # its waiting message goes with it: its client sees the connection drop
            assert await running.rest() == LONG
        history = await messages(on_a, session_id)
    assert isinstance(outcomes["lost with b"], httpx.HTTPError)
    assert outcomes["waits on a"] == "waits on a"
    assert [m["content"] for m in history] == [LONG, LONG, "waits on a", "waits on a"]


async def _line(clients: Sequence[httpx.AsyncClient], session_id: str) -> list[str]:
    """The session's waiting messages as the workers tell them, each seen once, first seen first."""
    seen: list[str] = []
    for client in clients:
        seen += [i for i in (await state(client, session_id))["queued_interactions"] if i not in seen]
    return seen


class Queue:
    """Messages sent with ``if_busy=enqueue``, each to a worker, one after the other once the one before waits;
    what each got back (its text, or the error that ended it)."""

    def __init__(self, session_id: str, clients: Sequence[httpx.AsyncClient], tg: anyio.abc.TaskGroup) -> None:
        self.session_id, self.clients, self.tg = session_id, clients, tg
        self.answers: dict[str, httpx.Response | httpx.HTTPError] = {}
        self.ids: dict[str, str] = {}  # text → interaction id

    async def send(self, client: httpx.AsyncClient, text: str) -> None:
        before = await _line(self.clients, self.session_id)
        self.tg.start_soon(self._post, client, text)
        await eventually(lambda: _longer(self.clients, self.session_id, len(before)))
        (self.ids[text],) = [i for i in await _line(self.clients, self.session_id) if i not in before]

    async def _post(self, client: httpx.AsyncClient, text: str) -> None:
        form = {"ui_session_id": self.session_id, "message": text, "if_busy": "enqueue"}
        try:
            self.answers[text] = await client.post("/api/v1/chat", data=form)
        except httpx.HTTPError as exc:
            self.answers[text] = exc


async def _longer(clients: Sequence[httpx.AsyncClient], session_id: str, than: int) -> bool:
    return len(await _line(clients, session_id)) > than


def _texts(history: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in history]


@pytest.mark.redis
async def test_across_workers_queued_messages_run_first_come_first_served(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server) as (on_a, on_b, session_id):
        async with Running(on_a, session_id) as running, anyio.create_task_group() as tg:
            queue = Queue(session_id, (on_a, on_b), tg)
            for client, text in ((on_b, "one"), (on_a, "two"), (on_b, "three")):
                await queue.send(client, text)
            assert await running.rest() == LONG
        history = await messages(on_b, session_id)
    assert {text: answer.text for text, answer in queue.answers.items()} == {t: t for t in ("one", "two", "three")}
    assert _texts(history) == [LONG, LONG, "one", "one", "two", "two", "three", "three"]


@pytest.mark.redis
async def test_across_workers_every_worker_tells_the_sessions_whole_line(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server, PARLEY_MAX_QUEUED="2") as (on_a, on_b, session_id):
        async with Running(on_a, session_id), anyio.create_task_group() as tg:
            queue = Queue(session_id, (on_a, on_b), tg)
            await queue.send(on_b, "one")
            await queue.send(on_a, "two")
            for client in (on_a, on_b):
                told = await state(client, session_id)
                assert (told["status"], told["queued"]) == ("streaming", 2), told
                assert told["queued_interactions"] == [queue.ids["one"], queue.ids["two"]], told
            # PARLEY_MAX_QUEUED counts the session's line, wherever its messages wait.
            form = {"ui_session_id": session_id, "message": "three", "if_busy": "enqueue"}
            assert_error(await on_b.post("/api/v1/chat", data=form), 429, "wait for this session")
            await on_b.post("/api/v1/cancel", data={"ui_session_id": session_id})
    assert [queue.answers[t].text for t in ("one", "two")] == ["one", "two"]  # type: ignore[union-attr]


@pytest.mark.redis
async def test_across_workers_a_cancel_takes_a_message_out_of_the_line_where_it_waits(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server) as (on_a, on_b, session_id):
        async with Running(on_a, session_id) as running, anyio.create_task_group() as tg:
            queue = Queue(session_id, (on_a, on_b), tg)
            await queue.send(on_b, "dropped")
            await queue.send(on_a, "kept")
            form = {"ui_session_id": session_id, "interaction_id": queue.ids["dropped"]}
            cancel = await on_a.post("/api/v1/cancel", data=form)
            assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
            await eventually(lambda: _now_waiting(on_b, session_id, [queue.ids["kept"]]))
            assert (await state(on_b, session_id))["status"] == "streaming"  # the running reply goes on
            assert await running.rest() == LONG
        history = await messages(on_a, session_id)
    assert_error(queue.answers["dropped"], 409, "cancelled while it waited")  # type: ignore[arg-type]
    assert _texts(history) == [LONG, LONG, "kept", "kept"]


async def _now_waiting(client: httpx.AsyncClient, session_id: str, ids: list[str]) -> bool:
    return bool((await state(client, session_id))["queued_interactions"] == ids)


@pytest.mark.redis
async def test_across_workers_deleting_a_session_ends_its_waiting_messages_with_404_on_every_worker(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server) as (on_a, on_b, session_id):
        async with Running(on_a, session_id), anyio.create_task_group() as tg:
            queue = Queue(session_id, (on_a, on_b), tg)
            await queue.send(on_b, "on b")
            await queue.send(on_a, "on a")
            assert (await on_b.delete(f"/api/v1/sessions/{session_id}")).status_code == 200
    for text in ("on a", "on b"):
        assert_error(queue.answers[text], 404, session_id)  # type: ignore[arg-type]


@pytest.mark.redis
async def test_across_workers_a_waiting_message_whose_client_leaves_leaves_the_line(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_workers(subprocesses, tmp_path, redis_server) as (on_a, on_b, session_id):
        async with Running(on_a, session_id) as running:
            form = {"ui_session_id": session_id, "message": "gone", "if_busy": "enqueue", "on_disconnect": "continue"}
            with anyio.move_on_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: on_b.post("/api/v1/chat", data=form))
                    await eventually(lambda: _queued(on_a, session_id, 1))  # (seen from the other worker)
                    tg.cancel_scope.cancel()  # the client goes away (its connection closes)
            await eventually(lambda: _queued(on_a, session_id, 0))
            async with anyio.create_task_group() as tg:
                queue = Queue(session_id, (on_a, on_b), tg)
                await queue.send(on_a, "next")
                assert await running.rest() == LONG
        history = await messages(on_a, session_id)
    assert queue.answers["next"].text == "next"  # type: ignore[union-attr]
    assert _texts(history) == [LONG, LONG, "next", "next"]


@pytest.mark.redis
async def test_across_workers_a_worker_killed_with_the_head_of_the_line_holds_up_the_others_only_briefly(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Three workers: the killed one's message waits first; the others wait on two workers, in an order that
    # neither worker alone could keep.
    env = {"PARLEY_ECHO_DELAY": "0.02", "PARLEY_REDIS_LEASE_SECONDS": "1", "PARLEY_REDIS_URL": redis_server.url}
    a, b, c = start_together(*(subprocesses({**env, "PARLEY_DATA_DIR": str(tmp_path / name)}) for name in "abc"))
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=20) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=20) as on_b,
        httpx.AsyncClient(base_url=c.url, timeout=20) as on_c,
    ):
        session_id = await new_session(on_a)
        async with Running(on_a, session_id) as running, anyio.create_task_group() as tg:
            queue = Queue(session_id, (on_a, on_b, on_c), tg)
            for client, text in ((on_b, "lost with b"), (on_c, "one"), (on_a, "two"), (on_c, "three")):
                await queue.send(client, text)
            b.stop(kill=True)  # its waiting message goes with it: its client sees the connection drop
            assert await running.rest() == LONG
        history = await messages(on_a, session_id)
    assert isinstance(queue.answers["lost with b"], httpx.HTTPError)
    assert {t: queue.answers[t].text for t in ("one", "two", "three")} == {t: t for t in ("one", "two", "three")}  # type: ignore[union-attr]
    assert _texts(history) == [LONG, LONG, "one", "one", "two", "two", "three", "three"]


async def test_the_ai_sdks_message_ids_are_kept_when_they_are_plain(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    for message_id in ("aB3_x-9", 'odd "id"'):
        body = {
            "id": session_id,
            "messages": [{"id": message_id, "role": "user", "parts": [{"type": "text", "text": message_id}]}],
        }
        assert (await client.post("/api/v1/chat", json=body, headers={"accept": "text/plain"})).status_code == 200
    users = [m["id"] for m in await messages(client, session_id) if m["role"] == "user"]
    # Letters, digits, '_' and '-' (the SDK's own ids, UUIDs) are kept; anything else gets parley's own id.
    assert users[0] == "aB3_x-9" and users[1].startswith("msg_")
