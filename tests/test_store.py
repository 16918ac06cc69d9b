"""The store contract. Every implementation runs these same tests (see the ``store`` fixture)."""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from parley.sessions import SQLiteStore, Store
from parley.sessions.errors import EditWithoutText, MessageNotFound, SessionExists, SessionNotFound
from parley.sessions.store import FileInfo, Message, Session, new_id, new_ordered_id, utcnow

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "sqlite-memory", "redis", "redis-cluster", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    kind = request.param
    store: Store
    if kind in ("redis", "redis-cluster"):
        from parley.sessions.redis import RedisStore, connect

        if kind == "redis":
            client = connect(request.getfixturevalue("shared_redis_url"))
        else:
            client = connect(request.getfixturevalue("redis_cluster").url, cluster=True)
        store = RedisStore(client, prefix=f"test-{secrets.token_hex(6)}:")
    elif kind == "postgres":
        from parley.sessions import postgres

        store = postgres.PostgresStore(postgres.connect(request.getfixturevalue("postgres_url")))
    else:
        store = SQLiteStore(tmp_path / "parley.db") if kind == "sqlite" else SQLiteStore(":memory:")
    await store.open()
    yield store
    await store.close()


def limit(count: int) -> Callable[[Session], int]:
    return lambda session: count


def turn(session_id: str, text: str = "hi") -> tuple[Message, Message]:
    interaction_id, now = new_id("int_"), utcnow()
    user = Message(new_id("msg_"), session_id, "user", text, ("file_a",), "complete", interaction_id, now)
    reply = Message(new_id("msg_"), session_id, "assistant", "", (), "streaming", interaction_id, now)
    return user, reply


async def test_sessions(store: Store) -> None:
    first, second = Session("s1", "echo", "2026-01-01T00:00:00Z"), Session("s2", "echo", "2026-01-02T00:00:00Z")
    await store.create_session(first)
    await store.create_session(second)
    with pytest.raises(SessionExists):
        await store.create_session(Session("s1", "other", utcnow()))
    assert await store.get_session("s1", "") == first
    assert await store.get_session("nope", "") is None
    assert await store.list_sessions("", 10, 0) == [second, first]
    assert await store.list_sessions("", 1, 1) == [first]
    assert await store.delete_session("s1", "") == []
    assert await store.delete_session("s1", "") is None
    assert await store.list_sessions("", 10, 0) == [second]


async def test_titles_are_set_or_taken_from_the_first_user_message(store: Store) -> None:
    await store.create_session(Session("named", "echo", "2026-01-01T00:00:00Z", "", "My title"))
    await store.create_session(Session("plain", "echo", "2026-01-02T00:00:00Z"))
    assert (await store.get_session("named", "")) == Session("named", "echo", "2026-01-01T00:00:00Z", "", "My title")
    assert (await store.get_session("plain", "")) == Session("plain", "echo", "2026-01-02T00:00:00Z")  # None yet
    long = "  What   is\n the " + "very " * 30 + "end?"
    await store.start_turn(*turn("plain", long), limit(0), owner="")
    await store.start_turn(*turn("plain", "a later question"), limit(0), owner="")
    await store.start_turn(*turn("named", "ignored for the title"), limit(0), owner="")
    title = "What is the " + "very " * 30
    expected = title[:79].rstrip() + "…"
    assert len(expected) <= 80
    assert [s.title for s in await store.list_sessions("", 10, 0)] == [expected, "My title"]
    assert (await store.get_session("plain", "")).title == expected  # type: ignore[union-attr]
    assert await store.set_title("plain", "", "Renamed") is True
    assert await store.set_title("plain", "alice", "Not hers") is False
    assert await store.set_title("nope", "", "No session") is False
    assert (await store.get_session("plain", "")).title == "Renamed"  # type: ignore[union-attr]
    assert await store.set_title("named", "", None) is True  # back to the first user message
    assert [s.title for s in await store.list_sessions("", 10, 0)] == ["Renamed", "ignored for the title"]


async def test_a_replaced_turn_takes_the_place_of_a_message_and_what_followed_it(store: Store) -> None:
    session = Session("s", "echo", utcnow())
    await store.create_session(session)
    turns = [turn("s", text) for text in ("one", "two", "three")]
    for user, reply in turns:
        await store.start_turn(user, reply, limit(0), owner="")
        await store.finish_turn(reply.id, user.content + "!", "complete")
    (u1, a1), (u2, a2), _ = turns
    before = await store.list_messages("s")

    # A regenerate: the second reply and all after it go; the new reply follows the same user message.
    ignored, again = turn("s", "not stored")
    assert await store.replace_turn(a2.id, ignored, again, limit(10), owner="") == (session, before[:2], before[2])
    assert [(m.id, m.content) for m in await store.list_messages("s")] == [
        (u1.id, "one"),
        (a1.id, "one!"),
        (u2.id, "two"),
        (again.id, ""),
    ]
    await store.finish_turn(again.id, "two again", "complete")

    # An edit, by the message's own id: it and all after it go; the new text (named by its client) takes its place.
    edited, reply = turn("s", "two, edited")
    edited = replace(edited, client_id="client-2")
    assert await store.replace_turn(u2.id, edited, reply, limit(1), owner="") == (session, before[1:2], edited)
    history = await store.list_messages("s")
    assert [(m.role, m.content, m.client_id) for m in history] == [
        ("user", "one", ""),
        ("assistant", "one!", ""),
        ("user", "two, edited", "client-2"),
        ("assistant", "", ""),
    ]
    assert history[2].to_json()["id"] == "client-2" and history[3].to_json()["id"] == reply.id
    assert await store.streaming_turn("s") == reply.interaction_id
    await store.finish_turn(reply.id, "ok", "complete")

    # keep (a regenerate from a user message): it stays as it is, what followed it goes.
    ignored, reply = turn("s", "not stored")
    assert await store.replace_turn("client-2", ignored, reply, limit(0), owner="", keep=True) == (
        session,
        [],
        history[2],
    )
    assert [m.id for m in await store.list_messages("s")] == [*(m.id for m in history[:3]), reply.id]
    await store.finish_turn(reply.id, "ok", "complete")

    # By its client's id; and the first message, which titles the session.
    first, reply = turn("s", "one, edited")
    first = replace(first, client_id="client-1")
    await store.replace_turn("client-2", replace(first, content="two, once more"), reply, limit(0), owner="")
    assert [m.content for m in await store.list_messages("s")][2:] == ["two, once more", ""]
    await store.finish_turn(reply.id, "ok", "complete")
    first, reply = turn("s", "one, edited")
    await store.replace_turn(u1.id, first, reply, limit(10), owner="")
    assert [m.content for m in await store.list_messages("s")] == ["one, edited", ""]
    assert (await store.get_session("s", "")).title == "one, edited"  # type: ignore[union-attr]


async def test_a_replace_that_cannot_be_done_changes_nothing(store: Store) -> None:
    await store.create_session(Session("s", "echo", utcnow()))
    user, reply = turn("s", "one")
    await store.start_turn(user, reply, limit(0), owner="")
    await store.finish_turn(reply.id, "one!", "complete")
    before = await store.list_messages("s")
    with pytest.raises(MessageNotFound):
        await store.replace_turn("msg_nowhere", *turn("s", "x"), limit(0), owner="")
    with pytest.raises(EditWithoutText):
        await store.replace_turn(user.id, *turn("s", "  "), limit(0), owner="")  # an edit without text
    with pytest.raises(SessionNotFound):
        await store.replace_turn(user.id, *turn("s", "x"), limit(0), owner="mallory")
    with pytest.raises(MessageNotFound):  # another session's message is no message of this one
        await store.create_session(Session("t", "echo", utcnow()))
        await store.replace_turn(user.id, *turn("t", "x"), limit(0), owner="")
    assert await store.list_messages("s") == before
    assert await store.list_messages("t") == []
    # missing_ok: a message the session does not have yet is a plain turn (the AI SDK's new message).
    new_user, new_reply = turn("s", "two")
    new_user = replace(new_user, client_id="client-new")
    assert await store.replace_turn("client-new", new_user, new_reply, limit(5), owner="", missing_ok=True) == (
        Session("s", "echo", (await store.get_session("s", "")).created_at),  # type: ignore[union-attr]
        before,
        new_user,
    )
    assert await store.list_messages("s") == [*before, new_user, new_reply]


async def test_another_owners_session_is_exactly_a_missing_one(store: Store) -> None:
    alices = Session("a1", "echo", "2026-01-01T00:00:00Z", "alice")
    bobs = Session("b1", "echo", "2026-01-02T00:00:00Z", "bob")
    opens = Session("o1", "echo", "2026-01-03T00:00:00Z")
    for session in (alices, bobs, opens):
        await store.create_session(session)
    with pytest.raises(SessionExists):  # ids are global: bob cannot take alice's
        await store.create_session(Session("a1", "echo", utcnow(), "bob"))
    assert await store.get_session("a1", "alice") == alices
    assert await store.get_session("a1", "bob") is None
    assert await store.get_session("a1", "") is None
    assert await store.get_session("o1", "alice") is None
    assert await store.list_sessions("alice", 10, 0) == [alices]
    assert await store.list_sessions("bob", 10, 0) == [bobs]
    assert await store.list_sessions("", 10, 0) == [opens]
    assert await store.list_sessions("carol", 10, 0) == []
    with pytest.raises(SessionNotFound):
        await store.start_turn(*turn("a1"), limit(10), owner="bob")
    assert await store.list_messages("a1") == []
    assert await store.streaming_turn("a1") is None
    assert await store.delete_session("a1", "bob") is None
    assert await store.get_session("a1", "alice") == alices
    user, reply = turn("a1")
    assert await store.start_turn(user, reply, limit(10), owner="alice") == (alices, [])
    assert await store.delete_session("a1", "alice") == []
    assert await store.list_sessions("alice", 10, 0) == []
    await store.create_session(Session("a1", "echo", utcnow(), "bob"))  # a deleted id is free for anyone
    assert await store.list_messages("a1") == []


async def test_turns(store: Store) -> None:
    session = Session("s", "echo", utcnow())
    await store.create_session(session)
    user, reply = turn("s", "hello")
    asked: list[Session] = []

    def ten(session: Session) -> int:
        asked.append(session)
        return 10

    assert await store.start_turn(user, reply, ten, owner="") == (session, [])
    assert asked == [session]  # the limit depends on the session (its agent)
    assert await store.list_messages("s") == [user, reply]
    await store.finish_turn(reply.id, "hello back", "cancelled")
    history = await store.list_messages("s")
    assert [(m.role, m.content, m.status, m.file_ids) for m in history] == [
        ("user", "hello", "complete", ("file_a",)),
        ("assistant", "hello back", "cancelled", ()),
    ]
    assert await store.list_messages("other") == []
    assert await store.start_turn(*turn("s", "again"), ten, owner="") == (
        session,
        history,
    )  # the history before the turn
    so_far = await store.list_messages("s")
    assert len(so_far) == 4
    assert await store.start_turn(*turn("s", "more"), limit(3), owner="") == (session, so_far[1:])
    assert await store.start_turn(*turn("s", "none"), limit(0), owner="") == (session, [])
    with pytest.raises(SessionNotFound):
        await store.start_turn(*turn("gone", "nobody here"), limit(0), owner="")
    assert await store.list_messages("gone") == []


async def test_a_turn_refused_by_its_history_limit_stores_nothing(store: Store) -> None:
    await store.create_session(Session("s", "retired-agent", utcnow()))

    def unknown_agent(session: Session) -> int:
        raise LookupError(session.agent)

    with pytest.raises(LookupError):
        await store.start_turn(*turn("s"), unknown_agent, owner="")
    assert await store.list_messages("s") == []
    assert await store.streaming_turn("s") is None


async def test_concurrent_operations_each_get_their_own_result(store: Store) -> None:
    await store.create_session(Session("s", "echo", utcnow()))
    results: dict[int, object] = {}

    async def create(i: int) -> None:
        try:
            await store.create_session(Session("s" if i % 10 == 0 else f"s{i}", "echo", utcnow()))
            results[i] = "created"
        except SessionExists:
            results[i] = "exists"

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(create, i)
    assert sorted(i for i, result in results.items() if result == "exists") == list(range(0, 100, 10))
    assert len(await store.list_sessions("", 1000, 0)) == 91


async def test_streaming_turn(store: Store) -> None:
    await store.create_session(Session("s", "echo", utcnow()))
    assert await store.streaming_turn("s") is None
    user, reply = turn("s")
    await store.start_turn(user, reply, limit(0), owner="")
    assert await store.streaming_turn("s") == reply.interaction_id
    assert await store.streaming_turn("other") is None
    await store.finish_turn(reply.id, "done", "complete")
    assert await store.streaming_turn("s") is None


async def test_checkpoints_save_the_text_so_far_of_replies_still_streaming(store: Store) -> None:
    replies: dict[str, Message] = {}
    for session_id in ("a", "b", "c"):
        await store.create_session(Session(session_id, "echo", utcnow()))
        user, replies[session_id] = turn(session_id)
        await store.start_turn(user, replies[session_id], limit(0), owner="")
    await store.finish_turn(replies["c"].id, "all of it", "complete")
    await store.checkpoint_turns({replies["a"].id: "so far", replies["b"].id: "so", replies["c"].id: "all"})
    await store.checkpoint_turns({replies["a"].id: "so far, more"})
    last = {session_id: (await store.list_messages(session_id))[-1] for session_id in replies}
    assert {session_id: (m.content, m.status) for session_id, m in last.items()} == {
        "a": ("so far, more", "streaming"),
        "b": ("so", "streaming"),
        "c": ("all of it", "complete"),  # no longer streaming: left as it was
    }
    await store.checkpoint_turns({})


async def test_interrupt_turns(store: Store) -> None:
    for session_id in ("a", "b"):
        await store.create_session(Session(session_id, "echo", utcnow()))
        await store.start_turn(*turn(session_id), limit(0), owner="")
    assert await store.interrupt_turns("a") == 1
    assert [m.status for m in await store.list_messages("a")] == ["complete", "interrupted"]
    assert [m.status for m in await store.list_messages("b")] == ["complete", "streaming"]
    assert await store.interrupt_turns() == 1
    assert await store.interrupt_turns() == 0
    assert [m.status for m in await store.list_messages("b")] == ["complete", "interrupted"]


async def test_a_final_record_never_changes(store: Store) -> None:
    # Issue 24 §1: a reply recorded interrupted (its owner looked dead) keeps its status and text when its owner's
    # late finish arrives; a checkpoint does not change it either.
    await store.create_session(Session("a", "echo", utcnow()))
    _, reply = turn("a")
    await store.start_turn(*(_, reply), limit(0), owner="")
    await store.checkpoint_turns({reply.id: "so far"})
    assert await store.interrupt_turns("a") == 1
    await store.finish_turn(reply.id, "so far and more", "complete")
    await store.checkpoint_turns({reply.id: "so far and more again"})
    last = (await store.list_messages("a"))[-1]
    assert (last.status, last.content) == ("interrupted", "so far")


async def test_deleting_a_session_deletes_its_history_and_files(store: Store) -> None:
    await store.create_session(Session("s", "echo", utcnow()))
    await store.start_turn(*turn("s"), limit(0), owner="")
    info = FileInfo("file_1", "s", "a.txt", "text/plain", 3, "ab" * 32, utcnow())
    await store.add_file(info)
    assert await store.delete_session("s", "") == ["file_1"]  # whose bytes the caller deletes
    await store.create_session(Session("s", "echo", utcnow()))
    assert await store.list_messages("s") == []
    assert await store.list_files("s") == []


async def test_files(store: Store) -> None:
    await store.create_session(Session("s", "echo", utcnow()))
    await store.create_session(Session("t", "echo", utcnow()))
    first = FileInfo("file_1", "s", "a.txt", "text/plain", 3, "ab" * 32, "2026-01-01T00:00:00Z")
    second = FileInfo("file_2", "s", "b.bin", "application/octet-stream", 9, "cd" * 32, "2026-01-02T00:00:00Z")
    await store.add_file(first)
    await store.add_file(second)
    assert await store.get_file("s", "file_1") == first
    assert await store.get_file("t", "file_1") is None  # another session's file is not there
    assert await store.list_files("s") == [first, second]
    assert await store.delete_file("t", "file_1") is False
    assert await store.delete_file("s", "file_1") is True
    assert await store.list_files("s") == [second]


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "deep" / "parley.db")
    await store.open()
    await store.create_session(Session("s", "echo", utcnow()))
    await store.start_turn(*turn("s"), limit(0), owner="")
    await store.close()
    again = SQLiteStore(tmp_path / "deep" / "parley.db")
    assert await again.get_session("s", "") is not None  # opens itself on first use
    assert len(await again.list_messages("s")) == 2
    await again.close()


async def test_sqlite_opens_a_file_another_process_is_writing_to(tmp_path: Path) -> None:
    # `uvicorn --workers 2` on one data directory: both workers open the new file at once, and one switched it
    # to WAL while the other was creating the schema. The switch fails at once with "database is locked"
    # (SQLite does not wait for it as it waits for writes): CI saw a worker refuse to start. Here the other
    # worker is a connection in the middle of a write, which it commits a little later.
    path = tmp_path / "parley.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other_worker (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO other_worker VALUES (1)")
    store = SQLiteStore(path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.open)
        await anyio.sleep(0.2)  # (the other write's length; the store waits for a condition, not this)
        other.execute("COMMIT")
    await store.create_session(Session("s", "echo", utcnow()))
    assert await store.get_session("s", "") is not None
    other.close()
    reader = sqlite3.connect(path)
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.close()
    await store.close()


async def test_sqlite_a_caller_that_ran_a_batch_gets_on_while_work_keeps_arriving(tmp_path: Path) -> None:
    # Regression: the caller that ran a batch used to go on running the next ones as long as work kept
    # arriving, so under steady load (the short-chat benchmark) its own request stalled for seconds.
    store = SQLiteStore(tmp_path / "parley.db")
    await store.open()
    feeding = True
    finished_while_feeding = False

    def slow(db: sqlite3.Connection) -> None:
        time.sleep(0.005)

    async def first_caller() -> None:
        nonlocal finished_while_feeding
        await store._run(slow)
        finished_while_feeding = feeding

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_caller)
        for _ in range(100):  # half a second of work arriving faster than one batch takes
            await anyio.sleep(0.002)
            tg.start_soon(store._run, slow)
        feeding = False
    await store.close()
    assert finished_while_feeding


async def test_sqlite_a_batch_survives_another_process_writing_between_its_reads_and_writes(tmp_path: Path) -> None:
    # Several worker processes may share one SQLite file. A batch that read first and wrote later used to
    # fail whole ("database is locked") when another process committed in between: the batch's snapshot
    # was stale. Here the other process is a second connection, and it tries to write in mid-batch.
    store = SQLiteStore(tmp_path / "parley.db")
    await store.open()
    await store.create_session(Session("s", "echo", utcnow()))
    other = sqlite3.connect(tmp_path / "parley.db", isolation_level=None, timeout=0, check_same_thread=False)
    others_write: list[str] = []

    def write_from_the_other_process(db: sqlite3.Connection) -> None:
        try:
            other.execute("INSERT INTO sessions (id, agent, created_at) VALUES ('o', 'echo', '')")
            others_write.append("committed")
        except sqlite3.OperationalError:
            others_write.append("waits")  # for this batch to commit (it gives up at once here: timeout=0)

    results: dict[str, object] = {}

    async def record(name: str, operation: Callable[[], Awaitable[object]]) -> None:
        results[name] = await operation()

    async with anyio.create_task_group() as tg:  # queued in the same tick: one batch, in this order
        tg.start_soon(record, "read", lambda: store.get_session("s", ""))
        tg.start_soon(record, "other", lambda: store._run(write_from_the_other_process))
        tg.start_soon(record, "write", lambda: store.create_session(Session("t", "echo", utcnow())))
    other.close()
    assert results["read"] == await store.get_session("s", "")
    assert await store.get_session("t", "") is not None
    assert others_write == ["waits"]
    await store.close()


def test_ordered_ids_sort_by_creation_time_and_look_like_the_others() -> None:
    made = []
    for _ in range(5):
        made.append(new_ordered_id("msg_"))
        time.sleep(0.001)
    assert made == sorted(made)
    assert len(set(made)) == 5
    assert all(re.fullmatch(r"msg_[0-9a-f]{32}", i) for i in made)
    assert len(made[0]) == len(new_id("msg_"))


def test_timestamps_are_utc_iso_8601_to_the_microsecond() -> None:
    before = datetime.now(UTC)
    stamps = [utcnow() for _ in range(3)]
    after = datetime.now(UTC)
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
        assert before <= datetime.fromisoformat(stamp) <= after
    assert stamps == sorted(stamps)


async def test_a_file_is_recorded_only_while_its_session_exists(store: Store) -> None:
    info = FileInfo("file_1", "gone", "a.txt", "text/plain", 3, "ab" * 32, utcnow())
    with pytest.raises(SessionNotFound):
        await store.add_file(info)
    await store.create_session(Session("gone", "echo", utcnow()))
    assert await store.list_files("gone") == []
    assert await store.get_file("gone", "file_1") is None


def _old_sqlite_file(path: Path) -> None:
    """A store file as parley wrote it before sessions had owners."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT NOT NULL, created_at TEXT NOT NULL);
        CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, role TEXT NOT NULL,
            content TEXT NOT NULL, file_ids TEXT NOT NULL, status TEXT NOT NULL, interaction_id TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE files (
            id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            filename TEXT NOT NULL, mime_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        INSERT INTO sessions VALUES ('old', 'echo', '2025-01-01T00:00:00Z');
        INSERT INTO messages (id, session_id, role, content, file_ids, status, interaction_id, created_at)
            VALUES ('msg_1', 'old', 'user', 'from before', '[]', 'complete', 'int_1', '2025-01-01T00:00:01Z');
        INSERT INTO files VALUES ('file_1', 'old', 'a.txt', 'text/plain', 3, 'ab', '2025-01-01T00:00:02Z');
        """
    )
    db.commit()
    db.close()


async def test_sqlite_serves_sessions_stored_before_owners_to_the_open_owner(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    _old_sqlite_file(path)
    first, second = SQLiteStore(path), SQLiteStore(path)  # two workers upgrading one file at once
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.open)
        tg.start_soon(second.open)
    await second.close()
    # (Stored before titles too: its title is its first user message's.)
    old = Session("old", "echo", "2025-01-01T00:00:00Z", "", "from before")
    assert await first.get_session("old", "") == old
    assert await first.get_session("old", "alice") is None
    assert await first.list_sessions("", 10, 0) == [old]
    assert [m.content for m in await first.list_messages("old")] == ["from before"]
    assert [f.id for f in await first.list_files("old")] == ["file_1"]
    before = await first.list_messages("old")
    assert await first.start_turn(*turn("old"), limit(10), owner="") == (replace(old, title=None), before)
    await first.create_session(Session("new", "echo", utcnow(), "alice"))
    assert [s.ui_session_id for s in await first.list_sessions("alice", 10, 0)] == ["new"]
    await first.close()


async def test_redis_serves_sessions_stored_before_owners_to_the_open_owner(shared_redis_url: str) -> None:
    from parley.sessions.redis import RedisStore, connect

    prefix = f"test-{secrets.token_hex(6)}:"
    redis = connect(shared_redis_url)
    # What the Redis store wrote before sessions had owners: no 'owner' field, one index of every session.
    await redis.hset(f"{prefix}session:old", mapping={"agent": "echo", "created_at": "2025-01-01T00:00:00Z"})
    await redis.zadd(f"{prefix}sessions", {"old": 1735689600.0})
    # (Moved to the layout with hash tags by the command the README names, as an operator does once.)
    from parley.sessions.redis_migrate import migrate

    assert await migrate(redis, prefix) == 1
    assert await migrate(redis, prefix) == 0
    store = RedisStore(redis, prefix=prefix)
    old = Session("old", "echo", "2025-01-01T00:00:00Z", "")
    assert await store.get_session("old", "") == old
    assert await store.get_session("old", "alice") is None
    assert await store.list_sessions("", 10, 0) == [old]
    assert await store.list_sessions("alice", 10, 0) == []
    assert await store.start_turn(*turn("old"), limit(10), owner="") == (old, [])
    assert await store.delete_session("old", "alice") is None
    assert await store.delete_session("old", "") == []
    assert await store.list_sessions("", 10, 0) == []
    await store.close()


REASONED = [
    {"type": "step-start"},
    {"type": "reasoning", "id": "reasoning-0", "text": "think", "state": "done"},
    {"type": "dynamic-tool", "toolName": "add", "toolCallId": "c1", "state": "output-available", "input": {"a": 1}},
    {"type": "text", "text": "two", "state": "done"},
]
USAGE = {"input_tokens": 10, "output_tokens": 4, "total_tokens": 14, "reasoning_tokens": 2}


async def test_a_reply_keeps_its_parts_and_usage(store: Store) -> None:
    await store.create_session(Session("p", "echo", utcnow()))
    user, reply = turn("p", "add")
    await store.start_turn(user, reply, limit(0), owner="")
    # A reply of text alone keeps no parts: they are its text. A user's message is its text.
    history = await store.list_messages("p")
    assert [m.all_parts() for m in history] == [[{"type": "text", "text": "add"}], []]
    assert [(m.parts, m.usage) for m in history] == [(None, None), (None, None)]
    await store.checkpoint_turns({reply.id: "tw"}, {reply.id: REASONED[:3]}, {reply.id: {**USAGE, "output_tokens": 1}})
    so_far = (await store.list_messages("p"))[-1]
    assert (so_far.content, so_far.parts, so_far.status) == ("tw", REASONED[:3], "streaming")
    assert so_far.usage == {**USAGE, "output_tokens": 1}  # the usage so far, too
    await store.finish_turn(reply.id, "two", "complete", parts=REASONED, usage=USAGE)
    await store.checkpoint_turns({reply.id: "late"}, {reply.id: []})  # a finished reply is left as it is
    done = (await store.list_messages("p"))[-1]
    assert (done.content, done.parts, done.usage, done.status) == ("two", REASONED, USAGE, "complete")
    assert done.to_json()["parts"] == REASONED and done.to_json()["usage"] == USAGE
    # The history an agent is given carries them too.
    _, earlier = await store.start_turn(*turn("p", "again"), limit(10), owner="")
    assert earlier[-1] == done
    plain_user, plain = turn("p", "plain")
    await store.start_turn(plain_user, plain, limit(0), owner="")
    await store.finish_turn(plain.id, "just text", "complete")
    last = (await store.list_messages("p"))[-1]
    assert (last.parts, last.usage, last.all_parts()) == (
        None,
        None,
        [{"type": "text", "text": "just text", "state": "done"}],
    )


async def test_one_checkpoint_saves_replies_of_text_alone_beside_replies_with_parts(store: Store) -> None:
    # One tick over every reply in progress: those of text alone keep no parts nor usage, the others keep theirs.
    await store.create_session(Session("m", "echo", utcnow()))
    await store.create_session(Session("n", "echo", utcnow()))
    (asked, acting), (said, plain) = turn("m", "add"), turn("n", "say")
    await store.start_turn(asked, acting, limit(0), owner="")
    await store.start_turn(said, plain, limit(0), owner="")
    await store.checkpoint_turns({acting.id: "tw", plain.id: "so"}, {acting.id: REASONED[:3]}, {acting.id: USAGE})
    reasoned, text = (await store.list_messages("m"))[-1], (await store.list_messages("n"))[-1]
    assert (reasoned.content, reasoned.parts, reasoned.usage) == ("tw", REASONED[:3], USAGE)
    assert (text.content, text.parts, text.usage, text.status) == ("so", None, None, "streaming")


async def test_a_tool_input_naming_a_client_id_is_not_the_message_a_replace_finds(store: Store) -> None:
    # A reply's tool call whose input (or output) has a "client_id" of its own: an edit of the user message named
    # by that id still finds the user message, not the reply (the Redis script looks for the key in their JSON).
    await store.create_session(Session("c", "echo", utcnow()))
    user, reply = turn("c", "look it up")
    user = replace(user, client_id="u1")
    await store.start_turn(user, reply, limit(0), owner="")
    call = {"type": "dynamic-tool", "toolName": "find", "toolCallId": "c1", "state": "output-available"}
    parts = [{**call, "input": {"client_id": "u1"}, "output": {"client_id": "u1"}}]
    await store.finish_turn(reply.id, "", "complete", parts=parts)
    edited, again = turn("c", "look it up, edited")  # an edit: the user message goes, not only the reply
    _, earlier, asked = await store.replace_turn("u1", edited, again, limit(0), owner="")
    assert (earlier, asked) == ([], edited)
    assert [m.id for m in await store.list_messages("c")] == [edited.id, again.id]


async def test_sqlite_files_from_before_parts_read_as_text_and_take_parts(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    _old_sqlite_file(path)
    store = SQLiteStore(path)
    await store.open()
    (old,) = await store.list_messages("old")
    assert (old.content, old.parts, old.usage) == ("from before", None, None)
    assert old.to_json()["parts"] == [{"type": "text", "text": "from before"}] and old.to_json()["usage"] is None
    user, reply = turn("old")
    await store.start_turn(user, reply, limit(10), owner="")
    await store.finish_turn(reply.id, "two", "complete", parts=REASONED, usage=USAGE)
    await store.close()
    reopened = SQLiteStore(path)  # the upgrade happens once: the second open finds the columns there
    messages = await reopened.list_messages("old")
    assert [(m.content, m.parts, m.usage) for m in messages] == [
        ("from before", None, None),
        ("hi", None, None),
        ("two", REASONED, USAGE),
    ]
    await reopened.close()


async def test_redis_messages_from_before_parts_read_as_text(shared_redis_url: str) -> None:
    from parley.sessions.redis import RedisStore, connect

    prefix = f"test-{secrets.token_hex(6)}:"
    redis = connect(shared_redis_url)
    store = RedisStore(redis, prefix=prefix)
    await store.create_session(Session("s", "echo", utcnow()))
    user, reply = turn("s", "hello")
    await store.start_turn(user, reply, limit(0), owner="")
    await store.finish_turn(reply.id, "hello back", "complete", parts=REASONED, usage=USAGE)
    # What the Redis store wrote before messages had parts: the same JSON with no "parts" nor "usage" key.
    messages_key = store.keys("s").messages
    row = json.loads(await redis.hget(messages_key, reply.id))
    assert (row.pop("parts"), row.pop("usage")) == (REASONED, USAGE)
    await redis.hset(messages_key, reply.id, json.dumps(row))
    history = await store.list_messages("s")
    assert [(m.content, m.parts, m.usage) for m in history] == [("hello", None, None), ("hello back", None, None)]
    assert history[-1].to_json()["parts"] == [{"type": "text", "text": "hello back", "state": "done"}]
    await store.close()
