"""Replies that outlive their connection: rejoin (GET /api/v1/chat/{id}/stream), on_disconnect, checkpoints."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import anyio
import httpx
import pytest

from tests.conftest import LiveServer, RedisServer, Subprocess, eventually, messages, new_session, start_together
from tests.openai_stub import OpenAIStub
from tests.test_chat_sse import SSE, check_stream, parse_sse

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(60))


async def _true(value: bool) -> bool:
    return value


class Reader:
    """Reads a streaming response in a task; ``text`` grows as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self.headers: httpx.Headers | None = None
        self.done = False

    async def read(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> None:
        async with client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
            self.headers = response.headers
            self.status = response.status_code
            async for chunk in response.aiter_text():
                self.text += chunk
        self.done = True


async def test_rejoin_replays_from_the_start_then_follows_live(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.03)
    async with server.client() as client:
        session_id = await new_session(client)
        assert (await client.get("/api/v1/chat/ses_nobody/stream")).status_code == 404
        assert (await client.get(f"/api/v1/chat/{session_id}/stream")).status_code == 204
        original, first, second, leaver = Reader(), Reader(), Reader(), Reader()
        data = {"ui_session_id": session_id, "message": WORDS}
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: original.read(client, "POST", "/api/v1/chat", data=data, headers=SSE))
            await eventually(lambda: _true(original.text.count("text-delta") >= 5))
            stream = f"/api/v1/chat/{session_id}/stream"
            tg.start_soon(lambda: first.read(client, "GET", stream))
            tg.start_soon(lambda: second.read(client, "GET", stream, headers=SSE))
            with anyio.move_on_after(0.2):  # a follower that leaves: the reply goes on
                await leaver.read(client, "GET", stream)
        assert not leaver.done
        assert original.headers is not None
        interaction_id = original.headers["x-interaction-id"]
        history = await messages(client, session_id)
        assert history[-1]["status"] == "complete"
        for reader in (original, first, second):
            assert reader.headers is not None and reader.headers["x-interaction-id"] == interaction_id
            assert reader.headers["content-type"] == "text/event-stream"
            assert check_stream(reader.text, interaction_id)[1] == history[-1]["content"] == WORDS
        assert first.text == original.text  # frame for frame
        assert (await client.get(f"/api/v1/chat/{session_id}/stream")).status_code == 204


async def test_rejoin_from_last_event_id_and_in_plain_text_from_an_offset(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.03)
    async with server.client() as client:
        session_id = await new_session(client)
        original, after, plain, other = Reader(), Reader(), Reader(), Reader()
        data = {"ui_session_id": session_id, "message": WORDS}
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: original.read(client, "POST", "/api/v1/chat", data=data, headers=SSE))
            await eventually(lambda: _true(original.text.count("text-delta") >= 5))
            assert original.headers is not None
            interaction_id = original.headers["x-interaction-id"]
            stream = f"/api/v1/chat/{session_id}/stream"
            tg.start_soon(lambda: after.read(client, "GET", stream, headers={"last-event-id": f"{interaction_id}:4"}))
            tg.start_soon(lambda: plain.read(client, "GET", stream + "?offset=7", headers={"accept": "text/plain"}))
            # Another interaction's id: a full replay.
            tg.start_soon(lambda: other.read(client, "GET", stream, headers={"last-event-id": "int_old:40"}))
        full = parse_sse(original.text)
        assert parse_sse(after.text) == full[5:]
        assert other.text == original.text
        assert plain.headers is not None and plain.headers["content-type"] == "text/plain; charset=utf-8"
        assert plain.text == WORDS[7:]


async def test_on_disconnect_continue_lets_the_reply_finish(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.02)
    async with server.client() as client:
        session_id = await new_session(client)
        received = ""
        data = {"ui_session_id": session_id, "message": WORDS}
        async with client.stream("POST", "/api/v1/chat?on_disconnect=continue", data=data) as response:
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 3:
                    break  # leaving closes the connection
        rest = await client.get(f"/api/v1/chat/{session_id}/stream", headers={"accept": "text/plain"})
        assert rest.status_code == 200
        assert rest.text == WORDS

        async def complete() -> bool:
            return (await messages(client, session_id))[-1]["status"] == "complete"

        await eventually(complete)
        assert (await messages(client, session_id))[-1]["content"] == WORDS

        # A later cancel still stops a reply whose client left.
        async with client.stream(
            "POST", "/api/v1/chat", json={"ui_session_id": session_id, "message": WORDS, "on_disconnect": "continue"}
        ) as response:
            async for _ in response.aiter_text():
                break
        answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
        assert answer.json()["cancelled"] is True

        async def cancelled() -> bool:
            return (await messages(client, session_id))[-1]["status"] == "cancelled"

        await eventually(cancelled)


async def test_the_history_shows_the_text_so_far_while_the_reply_streams(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.02, checkpoint_seconds=0.1)
    async with server.client() as client:
        session_id = await new_session(client)
        reader = Reader()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: reader.read(
                    client, "POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}
                )
            )

            async def partial() -> bool:
                history = await messages(client, session_id)
                return (
                    bool(history) and history[-1]["status"] == "streaming" and len(history[-1]["content"].split()) >= 3
                )

            await eventually(partial)
            last = (await messages(client, session_id))[-1]
            assert WORDS.startswith(last["content"])
        assert (await messages(client, session_id))[-1]["content"] == WORDS


async def test_a_killed_owner_leaves_its_checkpointed_text(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.02", "PARLEY_CHECKPOINT_SECONDS": "0.1"}
    server = subprocesses(env).start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        session_id = await new_session(client)
        received = ""
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}) as r:
            async for chunk in r.aiter_text():
                received += chunk
                if len(received.split()) >= 20:
                    break
            server.stop(kill=True)  # while its client is still connected
    restarted = subprocesses(env).start()
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as client:
        last = (await messages(client, session_id))[-1]
    assert last["status"] == "interrupted"
    assert len(last["content"].split()) >= 10  # checkpoints every 0.1 s, 20 words in 0.4 s
    assert received.startswith(last["content"]) or last["content"].startswith(received)


async def test_the_embedded_store_says_when_a_rejoin_cannot_reach_another_process(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "shared"), "PARLEY_ECHO_DELAY": "0.05"}
    a, b = start_together(subprocesses(env), subprocesses(env))
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": WORDS}
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=data) as response:
            async for _ in response.aiter_text():
                answer = await client.get(f"{b.url}/api/v1/chat/{session_id}/stream")
                assert answer.status_code == 500
                assert "PARLEY_REDIS_URL" in answer.json()["message"]
                break


@pytest.mark.redis
async def test_rejoin_from_another_worker_on_redis(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.03"}
    a, b = start_together(subprocesses(env), subprocesses(env))
    async with httpx.AsyncClient(timeout=20) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        assert (await client.get(f"{b.url}/api/v1/chat/{session_id}/stream")).status_code == 204
        original, full, after, plain = Reader(), Reader(), Reader(), Reader()
        data = {"ui_session_id": session_id, "message": WORDS}
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: original.read(client, "POST", f"{a.url}/api/v1/chat", data=data, headers=SSE))
            await eventually(lambda: _true(original.text.count("text-delta") >= 5))
            assert original.headers is not None
            interaction_id = original.headers["x-interaction-id"]
            stream = f"{b.url}/api/v1/chat/{session_id}/stream"
            tg.start_soon(lambda: full.read(client, "GET", stream))
            tg.start_soon(lambda: after.read(client, "GET", stream, headers={"last-event-id": f"{interaction_id}:6"}))
            tg.start_soon(lambda: plain.read(client, "GET", stream, headers={"accept": "text/plain"}))
        history = (await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]
        assert history[-1]["content"] == WORDS
        assert full.text == original.text
        assert check_stream(full.text, interaction_id)[1] == WORDS
        assert parse_sse(after.text) == parse_sse(original.text)[7:]
        assert plain.text == WORDS
        start = json.loads(parse_sse(full.text)[0][1])
        assert start["messageId"] == history[-1]["id"]


@pytest.mark.redis
async def test_a_killed_owner_on_redis_leaves_its_checkpointed_text(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    env = {
        "PARLEY_REDIS_URL": redis_server.url,
        "PARLEY_ECHO_DELAY": "0.02",
        "PARLEY_CHECKPOINT_SECONDS": "0.1",
        "PARLEY_REDIS_LEASE_SECONDS": "1",
    }
    a, b = start_together(subprocesses(env), subprocesses(env))
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        received = ""
        data = {"ui_session_id": session_id, "message": WORDS}
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=data) as response:
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 20:
                    break
            a.stop(kill=True)  # while its client is still connected

        async def interrupted() -> bool:
            turns = (await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]
            return turns[-1]["status"] == "interrupted"

        await eventually(interrupted, within=10)
        last = (await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")).json()["messages"][-1]
    assert len(last["content"].split()) >= 10
    assert received.startswith(last["content"]) or last["content"].startswith(received)


async def test_a_silent_model_still_gets_its_text_checkpointed_on_time(
    subprocesses: Callable[..., Subprocess], serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    # Two tokens, then a model that thinks (or a tool that runs) for as long as it likes: checkpoints run on time,
    # not on tokens, so the history shows the text so far and a kill -9 keeps it.
    stub = OpenAIStub(delay=0.01, behaviour="hang-mid")
    env = {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_OPENAI_BASE_URL": serve(stub).url + "/v1",
        "PARLEY_OPENAI_API_KEY": "sk-test",
        "PARLEY_AGENT": "openai",
        "PARLEY_CHECKPOINT_SECONDS": "0.2",
    }
    server = subprocesses(env).start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        session_id = await new_session(client)
        received = ""
        # (continue: leaving the loop below may close the connection; the reply must stream on regardless.)
        data = {"ui_session_id": session_id, "message": "hi", "on_disconnect": "continue"}
        async with client.stream("POST", "/api/v1/chat", data=data) as r:
            async for chunk in r.aiter_text():
                received += chunk
                if received == "tok0 tok1 ":
                    break

            async def saved() -> bool:
                last = (await messages(client, session_id))[-1]
                return bool(last["status"] == "streaming" and last["content"] == received)

            await eventually(saved, within=3)  # 0.2 s behind; 3 s for a loaded machine
            server.stop(kill=True)  # while its client is still connected
    restarted = subprocesses(env).start()
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as client:
        last = (await messages(client, session_id))[-1]
    assert (last["status"], last["content"]) == ("interrupted", received)


def _stalled_chat(url: str, session_id: str, message: str) -> socket.socket:
    """A chat (SSE, on_disconnect=continue) from a client that reads its response's head and then stops reading,
    with the connection left open and its receive buffer small: the server's sends soon block."""
    address = urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
    sock.connect((address.hostname or "", address.port or 80))
    body = json.dumps({"ui_session_id": session_id, "message": message, "on_disconnect": "continue"}).encode()
    head = (
        f"POST /api/v1/chat HTTP/1.1\r\nhost: {address.netloc}\r\ncontent-type: application/json\r\n"
        f"accept: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    sock.settimeout(10)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    return sock


def _read_to_the_end(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


async def test_a_client_that_stops_reading_does_not_hold_a_continue_reply_back(
    live: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = live(body_timeout_seconds=2)
    message = "ab " * 40_000  # ~4 MB of SSE frames: more than the sockets' buffers hold
    async with server.client() as client:
        session_id = await new_session(client)
        stalled = await anyio.to_thread.run_sync(_stalled_chat, server.url, session_id, message)
        try:

            async def complete() -> bool:
                last = (await messages(client, session_id))[-1]
                return bool(last["role"] == "assistant" and last["status"] == "complete")

            await eventually(complete, within=60)  # the reply runs to its end, and the history has it whole
            assert (await messages(client, session_id))[-1]["content"] == message
            again = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "next"})
            assert (again.status_code, again.text) == (200, "next")  # the session is free

            async def dropped() -> bool:
                return "dropped" in caplog.text

            await eventually(dropped, within=10)  # after the bound (2 s) without reading
            # Then it reads what it can, and its connection ends: what it got is the start of the reply.
            received = await anyio.to_thread.run_sync(_read_to_the_end, stalled)
        finally:
            stalled.close()
    text = "".join(
        json.loads(data[6:]).get("delta", "") for data in re.findall(rb"data: \{[^\n]*", received) if b"delta" in data
    )
    assert text and message.startswith(text)


@pytest.mark.redis
async def test_followers_on_another_worker_leave_its_redis_pool_to_its_requests(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    # Issue 24 §3.2. Each follower of a reply that runs on A used to hold one of B's pooled connections in a
    # blocking XREAD: with more followers than the pool (PARLEY_REDIS_MAX_CONNECTIONS), B's other requests waited
    # for a connection and answered 503. B reads each reply once, on a connection of its own, for all its followers.
    env = {
        "PARLEY_REDIS_URL": redis_server.url,
        "PARLEY_ECHO_DELAY": "0.03",
        "PARLEY_REDIS_MAX_CONNECTIONS": "8",
        "PARLEY_REDIS_POOL_TIMEOUT_SECONDS": "2",
    }
    a, b = start_together(subprocesses(env), subprocesses(env))
    message = " ".join(f"f{i}" for i in range(150))  # 4.5 s of stream
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client:
        session_ids = [(await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"] for _ in range(3)]
        originals = [Reader() for _ in session_ids]
        followers = [(session_id, Reader()) for session_id in session_ids for _ in range(8)]  # 3 times the pool
        others: list[int] = []
        async with anyio.create_task_group() as tg:
            for session_id, original in zip(session_ids, originals, strict=True):
                data = {"ui_session_id": session_id, "message": message}
                tg.start_soon(lambda d=data, r=original: r.read(client, "POST", f"{a.url}/api/v1/chat", data=d))
            await eventually(lambda: _true(all(len(r.text.split()) >= 3 for r in originals)))
            for session_id, follower in followers:
                stream = f"{b.url}/api/v1/chat/{session_id}/stream"
                tg.start_soon(lambda s=stream, r=follower: r.read(client, "GET", s, headers={"accept": "text/plain"}))
            await eventually(lambda: _true(all(r.headers is not None or r.done for _, r in followers)), within=10)
            # Meanwhile, B's own requests: a session made and a short chat, answered (no 503) while all follow.
            while not all(r.done for r in originals):
                created = await client.post(f"{b.url}/api/v1/sessions")
                others.append(created.status_code)
                if created.status_code != 201:
                    continue
                data = {"ui_session_id": created.json()["ui_session_id"], "message": "hi"}
                others.append((await client.post(f"{b.url}/api/v1/chat", data=data)).status_code)
        assert others and set(others) == {200, 201}, others
        for session_id, follower in followers:
            history = (await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]
            assert (history[-1]["status"], history[-1]["content"]) == ("complete", message)
            assert (follower.status, follower.text) == (200, message)


@pytest.mark.redis
async def test_a_follower_that_loses_redis_ends_without_a_finish(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    # Issue 24 §3.3. Redis stalls (SIGSTOP) while a follower on B reads a reply that runs on A: B's read fails, and
    # B cannot know how the reply ends. The follower used to be sent `finish` with status interrupted while the
    # reply went on to complete; it ends without a finish instead (its client rejoins), its deltas a prefix of the
    # reply's text. The stall is shorter than the lease: A's reply goes on and is recorded complete.
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.05", "PARLEY_REDIS_LEASE_SECONDS": "10"}
    a, b = start_together(subprocesses(env), subprocesses(env))
    message = " ".join(f"p{i}" for i in range(300))  # 15 s of stream
    assert redis_server.process is not None
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        original, follower, plain = Reader(), Reader(), Reader()
        data = {"ui_session_id": session_id, "message": message}
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: original.read(client, "POST", f"{a.url}/api/v1/chat", data=data))
            await eventually(lambda: _true(len(original.text.split()) >= 3))
            stream = f"{b.url}/api/v1/chat/{session_id}/stream"
            tg.start_soon(lambda: follower.read(client, "GET", stream))
            tg.start_soon(lambda: plain.read(client, "GET", stream, headers={"accept": "text/plain"}))
            await eventually(lambda: _true(follower.text.count("text-delta") >= 5 and len(plain.text.split()) >= 5))
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                # The followers end while Redis stalls (their reads time out), well before the reply would end.
                await eventually(lambda: _true(follower.done and plain.done), within=8)
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
        assert original.text == message

        async def recorded() -> bool:
            turns = (await client.get(f"{a.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]
            return bool(turns[-1]["status"] != "streaming")

        await eventually(recorded, within=10)
        last = (await client.get(f"{a.url}/api/v1/sessions/{session_id}/messages")).json()["messages"][-1]
    assert (last["status"], last["content"]) == ("complete", message)
    parts = [json.loads(data) for event_id, data in parse_sse(follower.text) if event_id is not None]
    assert "finish" not in [part["type"] for part in parts]
    deltas = "".join(part["delta"] for part in parts if part["type"] == "text-delta")
    assert deltas and message.startswith(deltas)
    assert plain.text and message.startswith(plain.text)
