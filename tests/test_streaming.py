"""The chat stream against a real server: tokens as they come, cancel, disconnect, busy, agent failure."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

from parley.agents import Agents, Turn
from parley.app import create_app
from tests.conftest import FailingAgent, LiveServer, eventually, make_settings, messages, new_session

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(200))


async def chat_chunks(client: httpx.AsyncClient, session_id: str, message: str) -> tuple[list[str], float, float]:
    """Stream a chat; return the chunks, and when the first and the last arrived (seconds after sending)."""
    chunks: list[str] = []
    start = time.monotonic()
    first = last = 0.0
    async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": message}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.headers["transfer-encoding"] == "chunked"
        async for chunk in r.aiter_text():
            chunks.append(chunk)
            last = time.monotonic() - start
            first = first or last
    return chunks, first, last


async def test_first_chunk_arrives_long_before_the_last(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.05)
    async with server.client() as client:
        session_id = await new_session(client)
        chunks, first, last = await chat_chunks(client, session_id, "one two three four five six seven eight nine ten")
    assert "".join(chunks) == "one two three four five six seven eight nine ten"
    assert len(chunks) >= 5
    assert last - first > 0.3  # ten tokens 50 ms apart: the first came while the rest were still being made


async def test_complete_reply_is_recorded(live: Callable[..., LiveServer]) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": " hi  there\n"})
        assert response.text == " hi  there\n"
        history = await messages(client, session_id)
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", " hi  there\n", "complete"),
        ("assistant", " hi  there\n", "complete"),
    ]
    assert history[0]["interaction_id"] == history[1]["interaction_id"] == response.headers["x-interaction-id"]


async def test_cancel_mid_stream_ends_it_and_records_what_was_sent(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.02)
    async with server.client() as client, server.client() as canceller:
        session_id = await new_session(client)
        received = ""
        answer: httpx.Response | None = None
        data = {"ui_session_id": session_id, "message": WORDS}
        async with client.stream("POST", "/api/v1/chat", data=data) as response:
            interaction_id = response.headers["x-interaction-id"]
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 5 and answer is None:  # (a chunk may carry several words)
                    cancelled_at = time.monotonic()
                    answer = await canceller.post(
                        "/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": interaction_id}
                    )
            ended_at = time.monotonic()
        assert answer is not None and answer.status_code == 200
        assert answer.json() == {
            "status": "success",
            "message": f"Cancellation signal sent for session: {session_id}",
            "cancelled": True,
        }
        assert ended_at - cancelled_at < 1.0
        assert 5 <= len(received.split()) < 200
        history = await messages(client, session_id)
        assert history[-1]["status"] == "cancelled"
        assert history[-1]["content"] == received
        # The session takes the next message at once.
        assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "idle"
        again = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "again"})
        assert again.text == "again"


async def test_cancel_of_an_idle_session_says_nothing_was_cancelled(live: Callable[..., LiveServer]) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
    assert answer.status_code == 200
    assert answer.json()["cancelled"] is False


async def test_cancel_on_one_session_leaves_another_whole(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.01)
    message = " ".join(f"x{i}" for i in range(40))
    async with server.client() as client:
        victim, bystander = await new_session(client), await new_session(client)
        results: dict[str, str] = {}

        async def run(session_id: str) -> None:
            chunks, _, _ = await chat_chunks(client, session_id, message)
            results[session_id] = "".join(chunks)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, victim)
            tg.start_soon(run, bystander)
            await eventually(lambda: _streaming(client, victim))
            await client.post("/api/v1/cancel", data={"ui_session_id": victim})
        assert results[bystander] == message
        assert len(results[victim]) < len(message)
        assert (await messages(client, bystander))[-1]["status"] == "complete"
        assert (await messages(client, victim))[-1]["status"] == "cancelled"


async def _streaming(client: httpx.AsyncClient, session_id: str) -> bool:
    return bool((await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "streaming")


async def test_a_stale_interaction_id_cancels_nothing(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.01)
    async with server.client() as client:
        session_id = await new_session(client)
        first = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "first"})
        stale = first.headers["x-interaction-id"]
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}) as r:
            answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": stale})
            assert answer.json()["cancelled"] is False
            body = await r.aread()
        assert body.decode() == WORDS
        assert (await messages(client, session_id))[-1]["status"] == "complete"


async def test_a_busy_session_refuses_a_second_message(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.05)
    async with server.client() as client:
        session_id = await new_session(client)
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}):
            second = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "me too"})
            assert second.status_code == 409
            assert second.json()["status"] == "error"
            assert "in progress" in second.json()["message"]
            await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
        history = await messages(client, session_id)
    assert [m["content"] for m in history if m["role"] == "user"] == [WORDS]  # the refused one left no trace


async def test_the_next_message_is_welcome_as_soon_as_the_reply_ends(live: Callable[..., LiveServer]) -> None:
    # The session is free before the client sees the end of the reply, not a moment after it: a client
    # that sends its next message at once, on the same connection, is not told 409. (A blocking client,
    # in a thread: it answers faster than an async one, which used to hide the race.)
    server = live(echo_delay=0)
    async with server.client() as client:
        session_id = await new_session(client)

    def chat_in_turn() -> list[tuple[int, str]]:
        answers = []
        with httpx.Client(base_url=server.url, timeout=10) as blocking:
            for turn in range(200):
                answer = blocking.post("/api/v1/chat", data={"ui_session_id": session_id, "message": f"m{turn}"})
                answers.append((answer.status_code, answer.text))
        return answers

    answers = await anyio.to_thread.run_sync(chat_in_turn)
    assert answers == [(200, f"m{turn}") for turn in range(200)]
    async with server.client() as client:
        assert [m["status"] for m in await messages(client, session_id)] == ["complete"] * 400


class ProbeAgent:
    """Streams forever, slowly, and notes when its iterator is closed."""

    name = "probe"
    description = "test agent"
    history_limit = 0

    def __init__(self) -> None:
        self.closed = anyio.Event()
        self.yielded = 0
        self.yielded_when_closed: int | None = None

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        try:
            while True:
                await anyio.sleep(0.01)
                self.yielded += 1
                yield "tick "
        finally:
            self.yielded_when_closed = self.yielded
            self.closed.set()


async def test_disconnect_cancels_the_agent_and_records_disconnected(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    probe = ProbeAgent()
    server = serve(create_app(make_settings(tmp_path, agent="probe"), agents=Agents([probe])))
    async with server.client() as client:
        session_id = await new_session(client)
        received = ""
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "go"}) as r:
            async for chunk in r.aiter_text():
                received += chunk
                if received.count("tick") >= 3:
                    break  # leaving the block closes the connection mid-stream
        # The agent's cleanup runs in the server's event loop (another thread).
        await eventually(lambda: _anyio_event_set(probe.closed))
        await eventually(lambda: _last_status_is(client, session_id, "disconnected"))
        # The turn is over and recorded: nothing produced after the agent was closed, at the disconnect.
        assert probe.yielded == probe.yielded_when_closed
        history = await messages(client, session_id)
        assert history[-1]["content"].startswith(received)


async def _anyio_event_set(event: anyio.Event) -> bool:
    return event.is_set()


async def _last_status_is(client: httpx.AsyncClient, session_id: str, status: str) -> bool:
    history = await messages(client, session_id)
    return bool(history and history[-1]["status"] == status)


async def test_agent_failure_before_the_first_token_is_a_500(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent(after=0)]))
    server = serve(app)
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert response.status_code == 500
        assert response.json() == {"status": "error", "message": "The model fell over."}
        history = await messages(client, session_id)
        assert [(m["role"], m["status"]) for m in history] == [("user", "complete"), ("assistant", "error")]
        assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "idle"


async def test_agent_failure_mid_stream_aborts_the_response(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent(after=3)]))
    server = serve(app)
    async with server.client() as client:
        session_id = await new_session(client)
        received = ""
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "x"}) as r:
                async for chunk in r.aiter_text():
                    received += chunk
        assert received == "t0 t1 t2 "
        history = await messages(client, session_id)
        assert (history[-1]["status"], history[-1]["content"]) == ("error", "t0 t1 t2 ")
        assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "idle"


async def test_a_session_whose_agent_is_gone_gets_a_503_and_keeps_its_history(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    # A session made for an agent that a restart no longer configures (say, the OpenAI settings removed).
    before = serve(create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent(after=0)])))
    async with before.client() as client:
        session_id = await new_session(client)
    after = serve(create_app(make_settings(tmp_path)))  # the same data directory, echo only
    async with after.client() as client:
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert response.status_code == 503
        assert response.json() == {
            "status": "error",
            "message": "This session's agent is not configured on this server: failing",
        }
        assert await messages(client, session_id) == []
        assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "idle"


async def test_delete_cancels_the_running_interaction(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.02)
    async with server.client() as client, server.client() as other:
        session_id = await new_session(client)
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}) as r:
            deleted = await other.delete(f"/api/v1/sessions/{session_id}")
            body = await r.aread()
        assert deleted.json()["status"] == "success"
        assert len(body.decode()) < len(WORDS)
        assert (await client.get(f"/api/v1/sessions/{session_id}")).status_code == 404


async def test_echo_stream_of_many_tokens_without_delay(live: Callable[..., LiveServer]) -> None:
    server = live()
    message = " ".join(f"word{i}" for i in range(20_000))
    async with server.client() as client:
        session_id = await new_session(client)
        chunks, _, _ = await chat_chunks(client, session_id, message)
    assert "".join(chunks) == message


async def test_cancelled_is_true_exactly_when_the_reply_is_recorded_cancelled(live: Callable[..., LiveServer]) -> None:
    # Cancels that race a short reply, sent as it starts, after its first word, ... after its last (racing its
    # end): whichever wins, the cancel's answer and the record agree.
    server = live(echo_delay=0.002)
    async with server.client() as client, server.client() as canceller:
        session_id = await new_session(client)
        answers: list[bool] = []
        for attempt in range(200):
            async with client.stream(
                "POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "one two three four five"}
            ) as response:
                fields = {"ui_session_id": session_id, "interaction_id": response.headers["x-interaction-id"]}

                async def cancel(fields: dict[str, str] = fields) -> None:
                    answers.append((await canceller.post("/api/v1/cancel", data=fields)).json()["cancelled"])

                words = attempt % 6  # the cancel goes once this many words have arrived
                received, sent = "", False
                async with anyio.create_task_group() as tg:
                    async for chunk in response.aiter_text():
                        received += chunk
                        if not sent and len(received.split()) >= words:
                            tg.start_soon(cancel)
                            sent = True
                    if not sent:  # (no body at all, or fewer words: the asserts below tell)
                        tg.start_soon(cancel)
            await eventually(lambda: _idle(client, session_id))
            record = (await messages(client, session_id))[-1]
            assert answers[-1] == (record["status"] == "cancelled"), (attempt, answers[-1], record, received)
            assert record["content"] == received
    # Both sides of the race were seen: otherwise this test proved nothing.
    assert set(answers) == {True, False}


async def _idle(client: httpx.AsyncClient, session_id: str) -> bool:
    return not await _streaming(client, session_id)


class RaisingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int, str]] = []

    def turn_started(self, turn: Any) -> None:
        self.seen.append(("started", turn.status, turn.tokens, turn.reason))
        raise RuntimeError("observers must not break a turn")

    def first_token(self, turn: Any) -> None:
        assert turn.first_token_at is not None
        self.seen.append(("first_token", turn.status, turn.tokens, turn.reason))
        raise RuntimeError("observers must not break a turn")

    def turn_ended(self, turn: Any) -> None:
        assert turn.ended_at is not None and turn.ended_at >= turn.started
        self.seen.append(("ended", turn.status, turn.tokens, turn.reason))
        raise RuntimeError("observers must not break a turn")


async def test_observers_see_each_turn_and_cannot_break_it(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    observer = RaisingObserver()
    server = serve(create_app(make_settings(tmp_path), observers=[observer]))
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "a b c"})
        assert response.text == "a b c"
        await eventually(lambda: _anyio_true(len(observer.seen) == 3))
    assert observer.seen == [
        ("started", "streaming", 0, ""),
        ("first_token", "streaming", 0, ""),
        ("ended", "complete", 3, "complete"),
    ]


async def _anyio_true(value: bool) -> bool:
    return value
