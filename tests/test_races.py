"""Races and load against real servers (issue 10, items 1, 5 and 6): uploads racing their session's delete, a
chat racing its file's delete, and more requests in flight than Redis has connections."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import LiveServer, RedisServer, Subprocess, new_session, start_together

pytestmark = pytest.mark.anyio

RACES = 120


def blobs_and_partials(files: Path) -> list[str]:
    return sorted(p.name for p in files.rglob("*") if p.is_file()) if files.exists() else []


async def race_uploads_with_deletes(upload_to: str, delete_on: str, sessions_on: str) -> tuple[list[int], list[int]]:
    """Create a session, then upload a file to it and delete it 0-4 ms apart, RACES times (ten at once)."""
    rng = random.Random(20261129)
    uploads: list[int] = []
    deletes: list[int] = []
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(gap: float, upload_first: bool) -> None:
            session_id = await new_session_at(client, sessions_on)

            async def upload() -> None:
                if not upload_first:
                    await anyio.sleep(gap)
                response = await client.post(
                    f"{upload_to}/api/v1/files",
                    data={"ui_session_id": session_id},
                    files={"file": ("race.txt", b"racing the delete\n" * 50, "text/plain")},
                )
                uploads.append(response.status_code)

            async def delete() -> None:
                if upload_first:
                    await anyio.sleep(gap)
                deletes.append((await client.delete(f"{delete_on}/api/v1/sessions/{session_id}")).status_code)

            async with anyio.create_task_group() as tg:
                tg.start_soon(upload)
                tg.start_soon(delete)

        for _ in range(RACES // 10):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one, rng.uniform(0, 0.004), rng.random() < 0.5)
    return uploads, deletes


async def new_session_at(client: httpx.AsyncClient, url: str) -> str:
    response = await client.post(f"{url}/api/v1/sessions")
    assert response.status_code == 201, response.text
    return str(response.json()["ui_session_id"])


async def test_uploads_racing_their_sessions_delete_on_sqlite(live: Callable[..., LiveServer], tmp_path: Path) -> None:
    server = live()
    uploads, deletes = await race_uploads_with_deletes(server.url, server.url, server.url)
    assert set(uploads) <= {201, 404}, uploads
    assert set(deletes) == {200}, deletes
    # Every session is gone: so is every file, record and bytes alike.
    assert blobs_and_partials(tmp_path / "data" / "files") == []
    with sqlite3.connect(tmp_path / "data" / "parley.db") as db:
        assert db.execute("SELECT count(*) FROM files").fetchone() == (0,)


async def test_uploads_racing_their_sessions_delete_on_two_workers_sharing_redis(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_DATA_DIR": str(tmp_path / "shared")}
    a, b = start_together(subprocesses(env), subprocesses(env))
    uploads, deletes = await race_uploads_with_deletes(a.url, b.url, a.url)
    assert set(uploads) <= {201, 404}, uploads
    assert set(deletes) == {200}, deletes
    assert blobs_and_partials(tmp_path / "shared" / "files") == []
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await redis.keys("parley:file:*") == []
        assert await redis.keys("parley:files:*") == []
    finally:
        await redis.aclose()


async def test_a_chat_whose_file_is_deleted_meanwhile_is_a_404(live: Callable[..., LiveServer], tmp_path: Path) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)

        async def upload() -> str:
            files = {"file": ("notes.txt", b"some notes\n", "text/plain")}
            response = await client.post("/api/v1/files", data={"ui_session_id": session_id}, files=files)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        # The moment of the race, made certain: the chat has read the file's record, its bytes are gone.
        file_id = await upload()
        (tmp_path / "data" / "files" / file_id).unlink()
        chat = {"ui_session_id": session_id, "message": "read this", "file_ids": f'["{file_id}"]'}
        response = await client.post("/api/v1/chat", data=chat)
        assert (response.status_code, response.json()["message"]) == (404, f"File not found: {file_id}")

        # And the race itself, many times over: a 200 with the file, or a 404, never a 500.
        statuses: list[int] = []
        for _ in range(40):
            file_id = await upload()

            async def chat_with(file_id: str) -> None:
                data = {"ui_session_id": session_id, "message": "hi", "file_ids": f'["{file_id}"]'}
                statuses.append((await client.post("/api/v1/chat", data=data)).status_code)

            async def delete(file_id: str) -> None:
                await client.delete(f"/api/v1/files/{session_id}/{file_id}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(chat_with, file_id)
                tg.start_soon(delete, file_id)
        assert set(statuses) <= {200, 404}, statuses


async def test_more_requests_in_flight_than_redis_connections_queue_rather_than_fail(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # One process, the default pool (100 connections): 150 chats and 150 history reads at once.
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.01"}
    server = subprocesses(env).start()
    message = " ".join(f"w{i}" for i in range(10))
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        session_ids = [await new_session(client) for _ in range(150)]
        replies: list[tuple[int, str]] = []
        reads: list[int] = []

        async def chat(session_id: str) -> None:
            response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": message})
            replies.append((response.status_code, response.text))

        async def read(session_id: str) -> None:
            reads.append((await client.get(f"/api/v1/sessions/{session_id}/messages")).status_code)

        async with anyio.create_task_group() as tg:
            for session_id in session_ids:
                tg.start_soon(chat, session_id)
        assert [status for status, _ in replies].count(200) == 150, sorted({s for s, _ in replies})
        assert {text for _, text in replies} == {message}
        async with anyio.create_task_group() as tg:
            for session_id in session_ids:
                tg.start_soon(read, session_id)
        assert reads.count(200) == 150, sorted(set(reads))


async def test_after_a_redis_restart_the_pools_stale_connections_are_not_an_outage(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    server = subprocesses(env).start()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
        session_ids = [await new_session(client) for _ in range(40)]

        async def all_at_once(chat: bool) -> list[int]:
            statuses: list[int] = []

            async def one(session_id: str) -> None:
                if chat:  # (a chat's first store call watches a key: redis-py reports a dead socket differently)
                    response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
                else:
                    response = await client.get(f"/api/v1/sessions/{session_id}/messages")
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for session_id in session_ids:
                    tg.start_soon(one, session_id)
            return statuses

        for chat in (False, True):
            assert set(await all_at_once(chat)) == {200}  # the pool now holds a few dozen connections
            redis_server.stop()
            await anyio.to_thread.run_sync(redis_server.start)  # same port, same data: every pooled socket is dead
            assert set(await all_at_once(chat)) == {200}


async def test_a_turn_is_written_with_one_connection_at_a_time_even_after_a_redis_restart(
    redis_server: RedisServer,
) -> None:
    from parley.sessions.redis import RedisStore, connect
    from parley.sessions.store import Message, Session, utcnow

    # One connection: start_turn must never hold one (its watch) while it waits for another.
    store = RedisStore(connect(redis_server.url, max_connections=1, pool_timeout=5))
    try:
        await store.create_session(Session("s", "echo", utcnow()))  # the pool's one connection is now open
        redis_server.stop()
        await anyio.to_thread.run_sync(redis_server.start)  # and now a dead socket
        now = utcnow()
        user = Message("msg_u", "s", "user", "hi", (), "complete", "int_1", now)
        reply = Message("msg_a", "s", "assistant", "", (), "streaming", "int_1", now)
        session, history = await store.start_turn(user, reply, lambda session: 10, owner="")
        assert (session.ui_session_id, history) == ("s", [])
        assert [m.id for m in await store.list_messages("s")] == ["msg_u", "msg_a"]
    finally:
        await store.close()
