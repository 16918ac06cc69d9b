"""PostgreSQL: migrations, files' bytes in the database, outages, and several hosts (separate data directories, no
shared disk) on one PostgreSQL and one Redis. The store contract itself runs in tests/test_store.py."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg import sql

from parley.sessions import postgres, postgres_schema
from parley.sessions.errors import EventLoopUnsupported, StoreUnavailable
from parley.sessions.postgres_blobs import CHUNK_BYTES
from parley.sessions.store import Message, Session, new_id, new_ordered_id, utcnow
from tests.conftest import ROOT, PostgresServer, RedisServer, Subprocess, eventually, start_together
from tests.test_redis import chat, history, session_on, stream_through_an_outage

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(100))


def tables(url: str) -> dict[str, int]:
    with psycopg.connect(url) as connection:
        counts = {}
        for table in ("sessions", "messages", "files", "blobs", "blob_chunks"):
            row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


async def test_concurrent_migrations_on_an_empty_then_an_older_database_apply_each_version_once(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def migrate_at_once(count: int) -> list[list[int]]:
        connections = [await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) for _ in range(count)]
        results: list[list[int]] = []

        async def one(connection: psycopg.AsyncConnection[Any]) -> None:
            results.append(await postgres_schema.migrate(connection))

        async with anyio.create_task_group() as tg:
            for connection in connections:
                tg.start_soon(one, connection)
        for connection in connections:
            await connection.close()
        return results

    latest = len(postgres_schema.MIGRATIONS)
    assert sorted(await migrate_at_once(4)) == [[], [], [], list(range(1, latest + 1))]
    # An older database: a new version appears, and processes that start at once apply it once between them.
    newer = (*postgres_schema.MIGRATIONS, ("CREATE TABLE parley_test_added (id integer)",))
    monkeypatch.setattr(postgres_schema, "MIGRATIONS", newer)
    assert sorted(await migrate_at_once(3)) == [[], [], [latest + 1]]
    with psycopg.connect(postgres_url) as connection:
        rows = connection.execute("SELECT version FROM parley_schema ORDER BY version").fetchall()
    assert [row[0] for row in rows] == list(range(1, latest + 2))


def host(subprocesses: Callable[..., Subprocess], tmp_path: Path, name: str, url: str, **env: str) -> Subprocess:
    """A parley process with a data directory of its own: a host that shares no disk with the others."""
    settings = {
        "PARLEY_DATABASE_URL": url,
        "PARLEY_DATA_DIR": str(tmp_path / name),
        "PARLEY_ECHO_DELAY": "0.05",
        "PARLEY_REDIS_LEASE_SECONDS": "1",
        "PARLEY_CHECKPOINT_SECONDS": "0.1",
        "PARLEY_DATABASE_POOL_TIMEOUT_SECONDS": "1",
        **env,
    }
    return subprocesses(settings, log=tmp_path / f"{name}.log")


async def test_two_processes_start_at_once_on_an_empty_database(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str
) -> None:
    a, b = start_together(
        host(subprocesses, tmp_path, "a", postgres_url), host(subprocesses, tmp_path, "b", postgres_url)
    )
    async with httpx.AsyncClient(timeout=10) as client:
        for server in (a, b):
            ready = await client.get(f"{server.url}/readyz")
            assert ready.status_code == 200, ready.text
        session_id = await session_on(client, a)
        assert (
            await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        ).text == "hi"
        assert [m["status"] for m in await history(client, a.url, session_id)] == ["complete", "complete"]


async def test_files_bytes_live_in_the_database_chunk_by_chunk(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str
) -> None:
    a = host(subprocesses, tmp_path, "a", postgres_url, PARLEY_MAX_UPLOAD_BYTES=str(3 * CHUNK_BYTES)).start()
    data = os.urandom(2 * CHUNK_BYTES + 1000)
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        uploaded = await client.post(
            f"{a.url}/api/v1/files", data={"ui_session_id": session_id}, files={"file": ("big.bin", data)}
        )
        assert uploaded.status_code == 201, uploaded.text
        info = uploaded.json()
        assert (info["size"], info["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert tables(postgres_url)["blob_chunks"] == 3
        download = await client.get(f"{a.url}/api/v1/files/{session_id}/{info['id']}/content")
        assert download.status_code == 200
        assert download.content == data and download.headers["content-length"] == str(len(data))
        too_large = await client.post(
            f"{a.url}/api/v1/files",
            data={"ui_session_id": session_id},
            files={"file": ("huge.bin", os.urandom(3 * CHUNK_BYTES + 1))},
        )
        assert too_large.status_code == 413
        assert tables(postgres_url)["blobs"] == 1  # the refused upload left nothing
        assert not (tmp_path / "a" / "files").exists() or not any((tmp_path / "a" / "files").iterdir())
        deleted = await client.delete(f"{a.url}/api/v1/files/{session_id}/{info['id']}")
        assert deleted.status_code == 200
        assert (tables(postgres_url)["blobs"], tables(postgres_url)["blob_chunks"]) == (0, 0)
        gone = await client.get(f"{a.url}/api/v1/files/{session_id}/{info['id']}/content")
        assert gone.status_code == 404


def test_a_database_url_that_cannot_work_stops_start_up_with_one_line_or_starts_not_ready(tmp_path: Path) -> None:
    env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    for url in ("mysql://root@127.0.0.1/parley", "postgresql://127.0.0.1:5432/x?nosuchparameter=1"):
        result = subprocess.run(
            [sys.executable, "-c", "import app"],
            cwd=ROOT,
            env={**env, "PARLEY_DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("parley: PARLEY_DATABASE_URL "), result.stderr


async def test_an_unknown_host_starts_not_ready_and_names_postgres(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    log = tmp_path / "a.log"
    a = subprocesses(
        {
            "PARLEY_DATABASE_URL": "postgresql://nobody@no-such-host.invalid/parley",
            "PARLEY_DATA_DIR": str(tmp_path / "a"),
            "PARLEY_DATABASE_POOL_TIMEOUT_SECONDS": "1",
        },
        log=log,
    ).start()
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{a.url}/readyz")
        assert ready.status_code == 503
        assert "postgres is down" in ready.json()["message"]
        refused = await client.post(f"{a.url}/api/v1/sessions")
        assert refused.status_code == 503
    assert "Traceback" not in log.read_text()


async def test_postgres_down_means_503_streams_go_on_and_are_recorded_when_it_is_back(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, own_postgres: PostgresServer
) -> None:
    url = own_postgres.create_database()
    a = host(subprocesses, tmp_path, "a", url, PARLEY_ECHO_DELAY="0.02").start()
    message = " ".join(f"x{i}" for i in range(60))  # 1.2 s of stream
    async with httpx.AsyncClient(timeout=20) as client:
        running, other = await session_on(client, a), await session_on(client, a)
        result = ""

        async def stream() -> None:
            nonlocal result
            async with chat(client, a, running, message) as response:
                async for chunk in response.aiter_text():
                    result += chunk

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            # The reply has started (its first words came), not only claimed: a session reads "streaming" from its
            # claim on, before its turn is in PostgreSQL (CI saw the start itself refused when PostgreSQL stopped).
            await eventually(lambda: _true(result != ""))
            own_postgres.stop()
            for request in (
                client.post(f"{a.url}/api/v1/chat", data={"ui_session_id": other, "message": "hi"}),
                client.get(f"{a.url}/api/v1/sessions/{other}/messages"),
                client.post(f"{a.url}/api/v1/sessions"),
            ):
                refused = await request
                assert refused.status_code == 503, refused.text
                assert refused.json()["status"] == "error"
            ready = await client.get(f"{a.url}/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["postgres"] != "ok"
        assert result == message  # the running stream went on
        own_postgres.start()

        async def recorded() -> bool:
            response = await client.get(f"{a.url}/api/v1/sessions/{running}/messages")
            return response.status_code == 200 and response.json()["messages"][-1]["status"] == "complete"

        await eventually(recorded, within=15)
        assert (await history(client, a.url, running))[-1]["content"] == message

        async def ready() -> bool:
            # (The pool replaces the connections PostgreSQL's restart broke; on a loaded machine a new one may take
            # longer than this test's 1 s pool timeout, and the request meanwhile is a 503, never a 500.)
            return (await client.get(f"{a.url}/readyz")).status_code == 200

        await eventually(ready, within=15)
        again = await client.post(f"{a.url}/api/v1/chat", data={"ui_session_id": other, "message": "back"})
        assert again.text == "back"
        metrics = (await client.get(f"{a.url}/metrics")).text
        assert 'parley_store_errors_total{store="postgres"}' in metrics
        assert 'parley_store_duration_seconds_count{store="postgres"}' in metrics


async def test_a_chat_that_waits_for_postgres_longer_than_its_lease_does_not_start_a_reply_nobody_holds(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, own_postgres: PostgresServer, redis_server: RedisServer
) -> None:
    # make soak: a chat that came while PostgreSQL was down took the session's claim in Redis, then waited for a
    # connection (the pool's timeout, 5 s by default) longer than the claim's lease (2 s there), which nothing
    # renews before the turn has started. PostgreSQL back, the reply started and streamed with its claim gone, and a
    # read on the other host took it for an orphan's: recorded "interrupted" with '' while its client read it whole.
    # The start must not outlast the lease: the chat is refused (503), and whatever it answers, history agrees.
    url = own_postgres.create_database()
    a, b = start_together(
        host(subprocesses, tmp_path, "a", url, PARLEY_REDIS_URL=redis_server.url,
             PARLEY_DATABASE_POOL_TIMEOUT_SECONDS="5"),
        host(subprocesses, tmp_path, "b", url, PARLEY_REDIS_URL=redis_server.url),
    )  # fmt: skip
    message = " ".join(f"u{i}" for i in range(20))  # 1 s of stream
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        own_postgres.stop()
        answers: list[httpx.Response] = []

        async def chat_now() -> None:
            data = {"ui_session_id": session_id, "message": message}
            answers.append(await client.post(f"{a.url}/api/v1/chat", data=data))

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat_now)
            await anyio.sleep(2)  # (an outage longer than the lease, not a wait for a condition)
            await anyio.to_thread.run_sync(own_postgres.start)
            while not answers:  # B's reads look for orphans while the reply would stream
                await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")
                await anyio.sleep(0.02)
        answer = answers[0]
        assert answer.status_code == 503, (answer.status_code, answer.text)
        assert "did not answer within" in answer.json()["message"]
        again: list[httpx.Response] = []

        async def served() -> bool:  # (PostgreSQL back: the pool's dead connections may answer 503 at first)
            again.append(await client.post(f"{a.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "b"}))
            return again[-1].status_code != 503

        await eventually(served, within=10)
        assert again[-1].status_code == 200 and again[-1].text == "b", again[-1].text
        # The refused chat left nothing: no reply that reads streaming, interrupted or final.
        turns = await history(client, b.url, session_id)
        assert [(t["role"], t["status"], t["content"]) for t in turns] == [
            ("user", "complete", "b"),
            ("assistant", "complete", "b"),
        ]


async def test_a_reply_that_outlives_postgres_for_longer_than_the_lease_is_read_final_only_with_its_own_text(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, own_postgres: PostgresServer, redis_server: RedisServer
) -> None:
    # Issue 24 §1 on PostgreSQL + Redis (make soak: a reply read to its end, recorded "interrupted" with ''). A's
    # reply ends while PostgreSQL is down, and A keeps trying to record it; PostgreSQL stays away longer than the
    # lease. A reader polling history through B (whose reads look for orphans) and A from the moment PostgreSQL is
    # back must see the reply final only with the text the client received: A, alive, holds its session until it
    # has recorded its reply, so nobody takes the reply for an orphan's.
    url = own_postgres.create_database()
    a, b = start_together(
        # (A short wait for a connection on A: its retries of the record sleep between tries, as under load, rather
        # than wait in the pool's queue for the first connection PostgreSQL's return makes.)
        host(
            subprocesses,
            tmp_path,
            "a",
            url,
            PARLEY_REDIS_URL=redis_server.url,
            PARLEY_ECHO_DELAY="0.02",
            PARLEY_DATABASE_POOL_TIMEOUT_SECONDS="0.2",
        ),
        host(subprocesses, tmp_path, "b", url, PARLEY_REDIS_URL=redis_server.url),
    )
    message = " ".join(f"v{i}" for i in range(60))  # 1.2 s of stream
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        # Longer than the lease (1 s) after the reply's end: A's claim would have run out meanwhile.
        received = await stream_through_an_outage(client, a, session_id, message, own_postgres.stop, down_for=4)
        seen: list[tuple[str, str]] = []

        async def read_history(server: Subprocess) -> None:
            with anyio.move_on_after(30):
                while len(seen) < 10:
                    answer = await client.get(f"{server.url}/api/v1/sessions/{session_id}/messages")
                    if answer.status_code == 200 and answer.json()["messages"][1]["status"] != "streaming":
                        turn = answer.json()["messages"][1]
                        seen.append((turn["status"], turn["content"]))

        async with anyio.create_task_group() as tg:
            for server in (a, b, a, b):  # (readers on A too, queued for its connections beside its record's retry)
                tg.start_soon(read_history, server)  # from the moment PostgreSQL answers again
            await anyio.to_thread.run_sync(own_postgres.start)
        assert received == message
        assert seen, "the reply was never recorded"
        assert seen[0] == ("complete", message), seen[0]
        assert all(record == seen[0] for record in seen)


async def test_two_hosts_on_postgres_and_redis_share_files_cancels_rejoins_and_deletes(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    a, b = start_together(
        host(subprocesses, tmp_path, "a", postgres_url, PARLEY_REDIS_URL=redis_server.url),
        host(subprocesses, tmp_path, "b", postgres_url, PARLEY_REDIS_URL=redis_server.url),
    )
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        # A file uploaded through A, used in a chat through B, downloaded from B: no shared disk.
        uploaded = await client.post(
            f"{a.url}/api/v1/files",
            data={"ui_session_id": session_id},
            files={"file": ("notes.txt", b"the launch code is 1234\n", "text/plain")},
        )
        assert uploaded.status_code == 201, uploaded.text
        file_id = uploaded.json()["id"]
        download = await client.get(f"{b.url}/api/v1/files/{session_id}/{file_id}/content")
        assert download.content == b"the launch code is 1234\n"
        used = await client.post(
            f"{b.url}/api/v1/chat", json={"ui_session_id": session_id, "message": "read it", "file_ids": [file_id]}
        )
        assert used.status_code == 200, used.text
        assert (await history(client, a.url, session_id))[-2]["file_ids"] == [file_id]

        # A stream on A, rejoined from B and cancelled through B.
        received, rejoined = "", ""
        async with chat(client, a, session_id, WORDS) as response:
            interaction_id = response.headers["x-interaction-id"]
            # One iterator kept to the end: dropping it would close the connection (a disconnect, not a cancel).
            chunks = response.aiter_text()
            while len(received.split()) < 3:
                received += await anext(chunks)
            async with client.stream(
                "GET", f"{b.url}/api/v1/chat/{session_id}/stream", headers={"accept": "text/plain"}
            ) as follow:
                assert follow.status_code == 200
                followed = follow.aiter_text()
                while len(rejoined.split()) < 5:
                    rejoined += await anext(followed)
                answer = await client.post(
                    f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": interaction_id}
                )
                assert answer.json()["cancelled"] is True
                async for chunk in followed:
                    rejoined += chunk
            async for chunk in chunks:
                received += chunk
        assert rejoined == received  # the rejoin from B saw the whole reply that A streamed
        turns = await history(client, b.url, session_id)
        assert (turns[-1]["status"], turns[-1]["content"]) == ("cancelled", received)

        # Deleted through B: its file's bytes go too, and A finds nothing.
        assert (await client.delete(f"{b.url}/api/v1/sessions/{session_id}")).status_code == 200
        assert (await client.get(f"{a.url}/api/v1/sessions/{session_id}")).status_code == 404
        assert (await client.get(f"{a.url}/api/v1/files/{session_id}/{file_id}/content")).status_code == 404
        assert tables(postgres_url)["blobs"] == 0


async def test_a_host_killed_mid_reply_leaves_the_other_to_serve_the_session_and_record_it_interrupted(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    a, b = start_together(
        host(subprocesses, tmp_path, "a", postgres_url, PARLEY_REDIS_URL=redis_server.url),
        host(subprocesses, tmp_path, "b", postgres_url, PARLEY_REDIS_URL=redis_server.url),
    )
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        received = ""

        async def saved() -> bool:
            content = (await history(client, b.url, session_id))[-1]["content"]
            return len(str(content).split()) >= 3

        async with chat(client, a, session_id) as response:
            chunks = response.aiter_text()
            received += await anext(chunks)
            await eventually(saved)  # a checkpoint has the text so far
            a.stop(kill=True)

        async def idle() -> bool:
            answer = await client.get(f"{b.url}/api/v1/sessions/{session_id}")
            return bool(answer.json()["status"] == "idle")

        await eventually(idle, within=5)
        turns = await history(client, b.url, session_id)
        assert [(t["role"], t["status"]) for t in turns] == [("user", "complete"), ("assistant", "interrupted")]
        assert len(turns[-1]["content"].split()) >= 3 and WORDS.startswith(turns[-1]["content"])
        again = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "b now"})
        assert again.text == "b now"


def test_postgres_refuses_trio_at_start_up_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    log = tmp_path / "server.log"
    env = {"PARLEY_DATABASE_URL": postgres_url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    server = Subprocess(env, ("--worker-class", "trio"), log=log, hypercorn=True).launch()
    assert server.process is not None
    try:
        server.process.wait(20)
    finally:
        server.stop(kill=True)
    output = log.read_text()
    refusal = [line for line in output.splitlines() if line.startswith("parley: ")]
    assert refusal == [
        "parley: PARLEY_DATABASE_URL: the PostgreSQL store runs on asyncio only (psycopg); serve parley on asyncio "
        "(uvicorn, or hypercorn's asyncio or uvloop worker class), not on trio"
    ], output
    assert "Traceback" not in output, output
    with pytest.raises(EventLoopUnsupported, match="asyncio only"):
        postgres.require_asyncio()  # (and in this thread, where no loop runs at all)


async def test_an_sqlite_history_moves_into_postgres_and_reads_the_same(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str
) -> None:
    data = tmp_path / "old"
    old = subprocesses({"PARLEY_DATA_DIR": str(data), "PARLEY_ECHO_DELAY": "0"}).start()
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, old)
        for text in ("one", "two"):
            await client.post(f"{old.url}/api/v1/chat", data={"ui_session_id": session_id, "message": text})
        uploaded = await client.post(
            f"{old.url}/api/v1/files", data={"ui_session_id": session_id}, files={"file": ("a.txt", b"bytes\n")}
        )
        file_id = uploaded.json()["id"]
        before = await history(client, old.url, session_id)
        old.stop()

        command = [sys.executable, "-m", "parley.sessions.postgres_import", str(data / "parley.db")]
        for _ in range(2):  # a second run finds everything there and changes nothing
            done = await anyio.run_process(
                command, env={**os.environ, "PARLEY_DATABASE_URL": postgres_url}, check=False
            )
            assert done.returncode == 0, done.stderr
        assert "sessions already there: 1" in done.stdout.decode()

        new = host(subprocesses, tmp_path, "new", postgres_url).start()
        assert await history(client, new.url, session_id) == before
        download = await client.get(f"{new.url}/api/v1/files/{session_id}/{file_id}/content")
        assert download.content == b"bytes\n"


async def test_an_sqlite_history_with_parts_usage_titles_and_client_ids_moves_into_postgres_with_them(
    tmp_path: Path, postgres_url: str
) -> None:
    from dataclasses import replace

    from parley.sessions import SQLiteStore, postgres
    from parley.sessions.store import Session
    from tests.test_store import REASONED, USAGE, limit, turn

    sqlite = SQLiteStore(tmp_path / "parley.db")
    await sqlite.create_session(Session("acted", "openai", "2026-01-01T00:00:00.000000Z", "alice"))
    user, reply = turn("acted", "add")
    await sqlite.start_turn(replace(user, client_id="ui-msg-1"), reply, limit(0), owner="alice")
    await sqlite.finish_turn(reply.id, "two", "complete", parts=REASONED, usage=USAGE)
    assert await sqlite.set_title("acted", "alice", "Sums")
    before = await sqlite.list_messages("acted")
    session_before = await sqlite.get_session("acted", "alice")
    await sqlite.close()
    command = [sys.executable, "-m", "parley.sessions.postgres_import", str(tmp_path / "parley.db")]
    done = await anyio.run_process(command, env={**os.environ, "PARLEY_DATABASE_URL": postgres_url}, check=False)
    assert done.returncode == 0, done.stderr
    store = postgres.PostgresStore(postgres.connect(postgres_url))
    await store.open()
    try:
        after = await store.list_messages("acted")
        session_after = await store.get_session("acted", "alice")
    finally:
        await store.close()
    assert after == before and after[-1].parts == REASONED and after[-1].usage == USAGE
    assert after[0].client_id == "ui-msg-1"
    assert session_after == session_before and session_after is not None and session_after.title == "Sums"


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(found for child in node.get("Plans", ()) for found in _plan_nodes(child))]


def _numbered(query: str) -> tuple[str, list[str]]:
    """A psycopg query's %(name)s placeholders as SQL's PREPARE takes them ($1, $2, ...), and their names."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return re.sub(r"%\((\w+)\)s", number, query), names


def _turn(session_id: str) -> tuple[Message, Message]:
    interaction, now = new_id("int_"), utcnow()
    user = Message(new_ordered_id("msg_"), session_id, "user", "hi", (), "complete", interaction, now)
    return user, Message(new_ordered_id("msg_"), session_id, "assistant", "", (), "streaming", interaction, now)


async def test_a_turn_finds_its_sessions_orphans_by_the_session_not_among_every_streaming_reply(
    postgres_url: str,
) -> None:
    """start_turn marks its session's turns left streaming interrupted. In the generic plan a prepared statement
    ends up with (psycopg prepares what it runs often), it must look that session up in the index of streaming
    turns, not read every reply streaming in every other session: that cost grew with the replies in flight."""
    store = postgres.PostgresStore(postgres.connect(postgres_url))
    await store.open()
    try:
        others = 20
        for _ in range(others + 1):
            session = Session(new_id("ses_"), "echo", utcnow())
            await store.create_session(session)
            user, reply = _turn(session.ui_session_id)
            await store.start_turn(user, reply, lambda _: 0, owner="")  # (left streaming: a reply in flight)
    finally:
        await store.close()
    user, reply = _turn(session.ui_session_id)  # the last session's next turn: one orphan of its own
    numbered, names = _numbered(postgres._START_TURN)
    params = postgres._start_turn_params(user, reply, {"echo": 0}, "")
    with psycopg.connect(postgres_url) as connection:  # (one transaction, rolled back)
        connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        connection.execute(f"PREPARE start_turn ({', '.join(['text'] * len(names))}) AS {numbered}")
        arguments = sql.SQL(", ").join(sql.Literal(params[name]) for name in names)
        explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE start_turn ({})").format(arguments)
        row = connection.execute(explain).fetchone()  # (EXECUTE takes its arguments as literals)
        connection.rollback()
    assert row is not None
    nodes = _plan_nodes(row[0][0]["Plan"])
    read = [node["Actual Rows"] for node in nodes if node.get("Index Name") == "messages_streaming"]
    assert read and sum(read) <= 1, nodes  # its own orphan, not the others' replies


ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


async def test_another_owner_hammering_a_session_on_another_host_never_makes_its_owners_chats_busy(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    # Issue 24 §3.4, on PostgreSQL and Redis. Bob's chat to Alice's session took the session's claim in Redis before
    # PostgreSQL's owner check refused it: meanwhile, Alice's chats on the other host answered 409. Nothing Bob does
    # changes what Alice sees, and Bob is answered as for a session that does not exist.
    keys = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_API_KEYS": f"alice:{ALICE},bob:{BOB}"}
    a, b = start_together(
        host(subprocesses, tmp_path, "a", postgres_url, PARLEY_ECHO_DELAY="0", **keys),
        host(subprocesses, tmp_path, "b", postgres_url, PARLEY_ECHO_DELAY="0", **keys),
    )
    alice, bob = {"authorization": f"Bearer {ALICE}"}, {"authorization": f"Bearer {BOB}"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client:
        created = await client.post(f"{a.url}/api/v1/sessions", headers=alice)
        session_id = created.json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": "hello there"}
        hers: list[int] = []
        his: list[int] = []
        done = False

        async def intrude(path: str) -> None:
            while not done:
                his.append((await client.post(f"{b.url}/api/v1/{path}", data=data, headers=bob)).status_code)

        async with anyio.create_task_group() as tg:
            for path in ("chat", "chat", "chat", "chat", "cancel", "cancel"):
                tg.start_soon(intrude, path)
            await eventually(lambda: _true(len(his) >= 20))
            for _ in range(40):
                answer = await client.post(f"{a.url}/api/v1/chat", data=data, headers=alice)
                hers.append(answer.status_code)
                assert answer.status_code == 200, (answer.status_code, answer.text, hers)
                assert answer.text == "hello there"
                # Her reply has ended: her session reads idle, whatever Bob's chats claim meanwhile.
                state = await client.get(f"{a.url}/api/v1/sessions/{session_id}", headers=alice)
                assert state.json()["status"] == "idle", (state.json(), hers)
            done = True
        assert set(his) == {404}, his
        assert hers == [200] * 40
        turns = (await client.get(f"{a.url}/api/v1/sessions/{session_id}/messages", headers=alice)).json()["messages"]
        assert len(turns) == 80 and {turn["status"] for turn in turns} == {"complete"}


async def _true(value: bool) -> bool:
    return value


async def test_statements_beyond_the_pools_connections_wait_their_turn_then_hear_503_after_the_pools_timeout(
    postgres_url: str,
) -> None:
    """More statements than connections wait for one in the store (not in the pool's queue), in order, and one
    that waits longer than the pool's timeout in all hears StoreUnavailable, then the store serves again."""
    store = postgres.PostgresStore(postgres.connect(postgres_url, max_connections=1, pool_timeout=0.5))
    await store.open()
    try:
        answers: list[str] = []
        slept = anyio.Event()
        store.pool.pop_stats()  # (the migration at open waited in the pool's queue for its first connection)

        async def hold(seconds: float) -> None:
            async def sleep(connection: psycopg.AsyncConnection[Any]) -> None:
                slept.set()
                await connection.execute("SELECT pg_sleep(%s)", (seconds,))

            await store.run(sleep)
            answers.append("held")

        async def ask(name: str) -> None:
            try:
                await store.fetch("SELECT 1")
                answers.append(name)
            except StoreUnavailable:
                answers.append(f"{name}: unavailable")

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, 0.2)
            await slept.wait()
            tg.start_soon(ask, "waited")  # the connection is free again well within the timeout
        assert answers == ["held", "waited"]
        assert store.pool.pop_stats().get("requests_queued", 0) == 0  # (each wait there costs a task and a timer)

        answers.clear()
        slept = anyio.Event()
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, 1.5)
            await slept.wait()
            tg.start_soon(ask, "too long")
        assert answers == ["too long: unavailable", "held"]
        assert anyio.current_time() - started < 2.5
        assert await store.fetch("SELECT 2") == [(2,)]
    finally:
        await store.close()
