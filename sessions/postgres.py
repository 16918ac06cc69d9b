"""The store on PostgreSQL (``PARLEY_DATABASE_URL=postgresql://...``): sessions, history, files' records and, in
:mod:`sessions.postgres_blobs`, files' bytes, so that the hosts serving one database share no disk.

It runs on **asyncio only**: psycopg's async connections (and its pool) are built on asyncio, and do not run
under trio. :meth:`PostgresStore.open` refuses other event loops with one line.

One chat costs two statements, each one round trip: :meth:`PostgresStore.start_turn` (the owner check, the
history read, both messages written, and the session's turns left ``streaming`` by a dead process marked
``interrupted``, in one statement) and :meth:`PostgresStore.finish_turn`. Connections come from a pool and are
held for one statement at a time, never for a stream. The schema is migrated at :meth:`~PostgresStore.open`
(:mod:`sessions.postgres_schema`). libpq reads the URL, so its ``PG*`` variables and ``sslmode`` work as usual.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import astuple
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from parley.sessions.errors import (
    EditWithoutText,
    EventLoopUnsupported,
    MessageNotFound,
    SessionExists,
    SessionGone,
    SessionNotFound,
    StoreUnavailable,
)
from parley.sessions.parts import Part, stored
from parley.sessions.postgres_schema import migrate
from parley.sessions.store import FileInfo, Message, MessageStatus, Session, derived_title, ignore_error

logger = logging.getLogger("parley")

T = TypeVar("T")
Pool = AsyncConnectionPool[AsyncConnection[Any]]
# Which interaction holds each of these sessions' claims, for a store whose claims live elsewhere (Redis).
Claims = Callable[[Collection[str]], Awaitable[Mapping[str, str]]]

_UNAVAILABLE = "The session store (PostgreSQL) is unavailable right now; try again shortly."
_SESSION_COLUMNS = "id, agent, created_at, owner"
_MESSAGE_COLUMNS = "id, session_id, role, content, file_ids, status, interaction_id, created_at, client_id"
# What is read of a message: what is written at a turn's start, and its parts and usage (see finish_turn).
_READ_COLUMNS = f"{_MESSAGE_COLUMNS}, parts, usage"
_HISTORY_COLUMNS = (
    "h.id, h.session_id, h.role, h.content, h.file_ids, h.status, h.interaction_id, h.created_at, h.client_id, "
    "h.parts, h.usage"
)
# A session with its title: the one set, or the start of its first user message (see derived_title).
_TITLED_COLUMNS = (
    "id, agent, created_at, owner, title, (SELECT left(m.content, 1000) FROM messages m "
    "WHERE m.session_id = sessions.id AND m.role = 'user' ORDER BY m.seq LIMIT 1)"
)
_FILE_COLUMNS = "id, session_id, filename, mime_type, size, sha256, created_at"

# One statement: the session (if it is the owner's); if its agent is one whose history limit is known (the
# limits, a JSON object by agent), its latest messages, both new ones written, and its turns still "streaming"
# marked "interrupted" (the caller holds the session's claim, so no live process can be writing them). Every part
# reads the statement's one snapshot: the history is what came before the new turn. An agent not in the limits
# writes nothing: the caller learns its limit from the session and runs this again. The orphans and the history
# are found by the session id itself, not through the CTEs: a prepared statement's generic plan then looks up
# that session's rows in the index, where a join to a CTE scanned every streaming turn of every session.
_START_TURN = f"""
WITH s AS (
    SELECT agent, created_at, (%(limits)s::jsonb ->> agent)::int AS history FROM sessions
    WHERE id = %(session)s AND owner = %(owner)s
), known AS (
    SELECT history FROM s WHERE history IS NOT NULL
), orphans AS (
    UPDATE messages SET status = 'interrupted'
    WHERE session_id = %(session)s AND status = 'streaming' AND EXISTS (SELECT 1 FROM known)
), added AS (
    INSERT INTO messages ({_MESSAGE_COLUMNS})
    SELECT v.* FROM known, (VALUES
        (%(u_id)s, %(session)s, 'user', %(u_content)s, %(u_files)s::jsonb, %(u_status)s, %(interaction)s, %(u_at)s,
         %(u_client)s),
        (%(a_id)s, %(session)s, 'assistant', %(a_content)s, %(a_files)s::jsonb, %(a_status)s, %(interaction)s,
         %(a_at)s, '')
    ) AS v(id, session_id, role, content, file_ids, status, interaction_id, created_at, client_id)
)
SELECT s.agent, s.created_at, s.history IS NOT NULL, (
    SELECT json_agg(json_build_array({_HISTORY_COLUMNS}) ORDER BY h.seq) FROM (
        SELECT seq, {_READ_COLUMNS} FROM messages WHERE session_id = %(session)s
        ORDER BY seq DESC LIMIT coalesce(s.history, 0)
    ) AS h
) FROM s
"""

# Checkpoints: the text (and parts, for replies that are not text alone, and usage) so far of replies still
# streaming, all in one statement.
_CHECKPOINT = """
UPDATE messages SET content = v.content, parts = v.parts::jsonb, usage = v.usage::jsonb
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS v(id, content, parts, usage)
WHERE messages.id = v.id AND messages.status = 'streaming'
"""

_DELETE_SESSION = """
WITH gone AS (DELETE FROM sessions WHERE id = %s AND owner = %s RETURNING id)
SELECT coalesce(array_agg(files.id ORDER BY files.seq) FILTER (WHERE files.id IS NOT NULL), '{}')
FROM gone LEFT JOIN files ON files.session_id = gone.id GROUP BY gone.id
"""


def check_url(url: str) -> None:
    """Raise ValueError, in one line, for a URL that cannot name a PostgreSQL database."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"must be a postgresql:// URL, got {url.split('://')[0]!r}://...")
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"cannot be read as a PostgreSQL URL: {str(exc).splitlines()[0]}") from None


def connect(url: str, max_connections: int = 20, pool_timeout: float = 5.0) -> Pool:
    """A pool of autocommit connections (each statement its own transaction: one round trip), opened by the
    store. A request waits up to ``pool_timeout`` seconds for a connection, then hears 503."""
    check_url(url)
    options: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in conninfo_to_dict(url):
        options["connect_timeout"] = 2  # PostgreSQL down: 503 soon rather than a hung request
    return AsyncConnectionPool(
        url, min_size=1, max_size=max_connections, timeout=pool_timeout, kwargs=options, open=False, name="parley"
    )


def require_asyncio() -> None:
    """Raise EventLoopUnsupported unless this runs on asyncio: psycopg's async connections know no other loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise EventLoopUnsupported(
            "PARLEY_DATABASE_URL: the PostgreSQL store runs on asyncio only (psycopg); serve parley on asyncio "
            "(uvicorn, or hypercorn's asyncio or uvloop worker class), not on trio"
        ) from None


class PostgresStore:
    """The store on PostgreSQL. Behaves exactly like :class:`sessions.sqlite.SQLiteStore` (same tests).

    ``claims``: with the coordinator in Redis, which interaction holds each session's claim, so that
    :meth:`interrupt_turns` interrupts only the turns whose process is gone. Without it, every turn left
    ``streaming`` is taken for an orphan when :meth:`interrupt_turns` runs (at start-up, as on SQLite).
    """

    name = "postgres"
    # start_turn marks the session's turns left streaming "interrupted" (its caller holds the session's claim).
    interrupts_orphans_in_start_turn = True

    def __init__(self, pool: Pool, claims: Claims | None = None, finish_retry_seconds: float = 300.0) -> None:
        self.pool = pool
        self.claims = claims
        self.finish_retry_seconds = finish_retry_seconds
        # The app points these at its metrics: an operation that failed, and how long each took.
        self.on_error: Callable[[str], None] = ignore_error
        self.on_duration: Callable[[str, float], None] = _ignore_duration
        self._opened = False
        self._open_lock = anyio.Lock()
        # One statement per lent connection: a statement that finds every connection lent waits here, not in the
        # pool's queue, where each wait costs a task and a timer (psycopg_pool's WaitingClient): with more chats
        # in flight than connections, nearly every statement waited there (5 % of a short chat's instructions).
        self._lendable = anyio.Semaphore(pool.max_size)
        # History limits by agent, as each caller's history_limit gave them (see start_turn).
        self._limits: dict[Callable[[Session], int], dict[str, int]] = {}

    async def open(self) -> None:
        require_asyncio()
        async with self._open_lock:
            if self._opened:
                return
            await self.pool.open(wait=False)

            async def migrated(connection: AsyncConnection[Any]) -> None:
                applied = await migrate(connection)
                if applied:
                    logger.info("PostgreSQL schema migrated to version %d", applied[-1])

            await self.run(migrated)
            self._opened = True

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, operation: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``operation`` on a pooled connection; PostgreSQL unreachable (or restarted) is StoreUnavailable."""
        started = time.perf_counter()
        try:
            waited = await self._lend()
            try:
                try:
                    async with self.pool.connection(max(self.pool.timeout - waited, 0.001)) as connection:
                        return await operation(connection)
                except psycopg.OperationalError as exc:
                    if isinstance(exc, PoolTimeout | pg_errors.QueryCanceled):
                        raise  # (no connection to be had, or a statement that ran out of time: not a dead socket)
                # After PostgreSQL restarts, the pool's idle connections are dead: drop them and try once more.
                await self.pool.check()
                async with self.pool.connection() as connection:
                    return await operation(connection)
            finally:
                self._lendable.release()
        except psycopg.OperationalError:
            self.on_error(self.name)
            raise StoreUnavailable(_UNAVAILABLE) from None
        finally:
            self.on_duration(self.name, time.perf_counter() - started)

    async def _lend(self) -> float:
        """Wait, up to the pool's timeout, until fewer statements than the pool's connections are running; how
        long it waited (the pool's own wait for a connection, in an outage, has what is left of the timeout)."""
        if self._lendable.value:  # (a connection is free: nobody waits, since a release hands it to a waiter)
            self._lendable.acquire_nowait()
            return 0.0
        started = time.monotonic()
        try:
            with anyio.fail_after(self.pool.timeout):
                await self._lendable.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no connection free after {self.pool.timeout:.2f} s") from None
        return time.monotonic() - started

    async def fetch(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """One statement's rows."""

        async def fetch(connection: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cursor = await connection.execute(query, params)
            return await cursor.fetchall()

        return await self.run(fetch)

    async def execute(self, query: str, params: Any = None) -> int:
        """One statement; the number of rows it wrote."""

        async def write(connection: AsyncConnection[Any]) -> int:
            cursor = await connection.execute(query, params)
            return cursor.rowcount

        return await self.run(write)

    # sessions

    async def create_session(self, session: Session) -> None:
        rows = await self.fetch(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}, title) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING "
            "RETURNING 1",
            (session.ui_session_id, session.agent, session.created_at, session.owner, session.title),
        )
        if not rows:
            raise SessionExists(session.ui_session_id)

    async def get_session(self, session_id: str, owner: str) -> Session | None:
        rows = await self.fetch(
            f"SELECT {_TITLED_COLUMNS} FROM sessions WHERE id = %s AND owner = %s", (session_id, owner)
        )
        return _titled(rows[0]) if rows else None

    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        rows = await self.fetch(
            f"SELECT {_TITLED_COLUMNS} FROM sessions WHERE owner = %s "
            "ORDER BY created_at DESC, seq DESC LIMIT %s OFFSET %s",
            (owner, limit, offset),
        )
        return [_titled(row) for row in rows]

    async def set_title(self, session_id: str, owner: str, title: str | None) -> bool:
        count = await self.execute(
            "UPDATE sessions SET title = %s WHERE id = %s AND owner = %s", (title, session_id, owner)
        )
        return count > 0

    async def delete_session(self, session_id: str, owner: str) -> list[str] | None:
        rows = await self.fetch(_DELETE_SESSION, (session_id, owner))
        return list(rows[0][0]) if rows else None  # (the files' rows went with the session: ON DELETE CASCADE)

    # history

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], *, owner: str
    ) -> tuple[Session, list[Message]]:
        # The limit depends on the session's agent, which this statement is the first to read: the limits of the
        # agents seen so far go with it, and only a session whose agent is new to this process costs a second.
        limits = self._limits.get(history_limit)
        if limits is None:
            if len(self._limits) > 64:  # (callers that pass a new function every time: forget the old ones)
                self._limits.clear()
            limits = self._limits[history_limit] = {}
        row = await self._start_turn(user, assistant, limits, owner)
        if row is None:
            raise SessionNotFound(user.session_id)
        session = Session(user.session_id, row[0], row[1], owner)
        if not row[2]:
            limits[session.agent] = history_limit(session)  # whatever it raises, nothing is stored
            row = await self._start_turn(user, assistant, limits, owner)
            if row is None or not row[2]:
                raise SessionGone(user.session_id)
        return session, [_message(entry) for entry in row[3] or ()]

    async def _start_turn(
        self, user: Message, assistant: Message, limits: dict[str, int], owner: str
    ) -> tuple[Any, ...] | None:
        params = _start_turn_params(user, assistant, limits, owner)
        try:
            rows = await self.fetch(_START_TURN, params)
        except pg_errors.ForeignKeyViolation:
            raise SessionGone(user.session_id) from None  # deleted while the statement ran
        except pg_errors.UniqueViolation:
            # Only a retry after a connection lost as the first try committed (see run) writes the same ids again.
            raise StoreUnavailable(_UNAVAILABLE) from None
        return rows[0] if rows else None

    async def replace_turn(
        self,
        target: str,
        user: Message,
        assistant: Message,
        history_limit: Callable[[Session], int],
        *,
        owner: str,
        missing_ok: bool = False,
        keep: bool = False,
    ) -> tuple[Session, list[Message], Message]:
        session_id = user.session_id

        async def replace(connection: AsyncConnection[Any]) -> tuple[Session, list[Message], Message]:
            async with connection.transaction():
                found = await (
                    await connection.execute(
                        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = %s AND owner = %s FOR UPDATE",
                        (session_id, owner),
                    )
                ).fetchone()
                if found is None:
                    raise SessionNotFound(session_id)
                session = Session(*found)
                limit = history_limit(session)
                # The caller holds the session's claim: a turn still streaming is an orphan.
                await connection.execute(
                    "UPDATE messages SET status = 'interrupted' WHERE session_id = %s AND status = 'streaming'",
                    (session_id,),
                )
                row = await (
                    await connection.execute(
                        f"SELECT seq, {_READ_COLUMNS} FROM messages WHERE session_id = %s "
                        "AND (client_id = %s OR (client_id = '' AND id = %s)) ORDER BY seq DESC LIMIT 1",
                        (session_id, target, target),
                    )
                ).fetchone()
                asked, start, cut = user, None, None
                if row is None:
                    if not missing_ok:
                        raise MessageNotFound(target)
                elif row[3] == "assistant":  # a regenerate: the reply goes, the user message before it stays
                    before = await (
                        await connection.execute(
                            f"SELECT seq, {_READ_COLUMNS} FROM messages WHERE session_id = %s AND seq < %s "
                            "AND role = 'user' ORDER BY seq DESC LIMIT 1",
                            (session_id, row[0]),
                        )
                    ).fetchone()
                    if before is None:
                        raise MessageNotFound(target)
                    start, cut, asked = before[0], row[0], _message(before[1:])
                elif keep:  # a regenerate from the user message: it stays, what follows it goes
                    start, cut, asked = row[0], row[0] + 1, _message(row[1:])
                else:  # an edit
                    if not user.content.strip():
                        raise EditWithoutText()
                    start = cut = row[0]
                history: list[Message] = []
                if limit > 0:
                    earlier = await (
                        await connection.execute(
                            f"SELECT {_READ_COLUMNS} FROM messages WHERE session_id = %s AND seq < %s "
                            "ORDER BY seq DESC LIMIT %s",
                            (session_id, start if start is not None else 2**62, limit),
                        )
                    ).fetchall()
                    history = [_message(entry) for entry in reversed(earlier)]
                if cut is not None:
                    await connection.execute(
                        "DELETE FROM messages WHERE session_id = %s AND seq >= %s", (session_id, cut)
                    )
                for message in (user, assistant) if asked is user else (assistant,):
                    await connection.execute(
                        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
                        (
                            message.id,
                            message.session_id,
                            message.role,
                            message.content,
                            json.dumps(list(message.file_ids)),
                            message.status,
                            message.interaction_id,
                            message.created_at,
                            message.client_id,
                        ),
                    )
                return session, history, asked

        return await self.run(replace)

    async def finish_turn(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        row = (content, status, stored(parts), stored(usage), message_id)
        # The last word of an interaction must not be lost to an outage: keep trying until PostgreSQL is back.
        deadline = time.monotonic() + self.finish_retry_seconds
        delay = 0.05
        while True:
            try:
                await self.execute(  # a final record never changes (one recorded interrupted meanwhile stays so)
                    "UPDATE messages SET content = %s, status = %s, parts = %s::jsonb, usage = %s::jsonb "
                    "WHERE id = %s AND status = 'streaming'",
                    row,
                )
                return
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise StoreUnavailable("The session store (PostgreSQL) stayed unavailable.") from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def checkpoint_turns(
        self,
        contents: Mapping[str, str],
        parts: Mapping[str, Sequence[Part]] | None = None,
        usages: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        parts, usages = parts or {}, usages or {}
        folded = [stored(parts.get(message_id)) for message_id in contents]
        used = [stored(usages.get(message_id)) for message_id in contents]
        await self.execute(_CHECKPOINT, (list(contents), list(contents.values()), folded, used))

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        if self.claims is None:
            if session_id is None:
                return await self.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
            return await self.execute(
                "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND session_id = %s",
                (session_id,),
            )
        if session_id is None:
            rows = await self.fetch("SELECT session_id, interaction_id FROM messages WHERE status = 'streaming'")
        else:
            rows = await self.fetch(
                "SELECT session_id, interaction_id FROM messages WHERE status = 'streaming' AND session_id = %s",
                (session_id,),
            )
        if not rows:
            return 0
        # A turn whose interaction holds its session's claim is alive. Another is an orphan, and stays one: a new
        # turn of its session would have a new interaction id, so the claims read now cannot be outdated for it.
        held = await self.claims({sid for sid, _ in rows})
        orphans = [interaction for sid, interaction in rows if held.get(sid) != interaction]
        if not orphans:
            return 0
        return await self.execute(
            "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND interaction_id = ANY(%s)",
            (orphans,),
        )

    async def list_messages(self, session_id: str) -> list[Message]:
        rows = await self.fetch(
            f"SELECT {_READ_COLUMNS} FROM messages WHERE session_id = %s ORDER BY seq", (session_id,)
        )
        return [_message(row) for row in rows]

    async def streaming_turn(self, session_id: str) -> str | None:
        rows = await self.fetch(
            "SELECT interaction_id FROM messages WHERE status = 'streaming' AND session_id = %s "
            "ORDER BY seq DESC LIMIT 1",
            (session_id,),
        )
        return str(rows[0][0]) if rows else None

    # files

    async def add_file(self, info: FileInfo) -> None:
        try:
            count = await self.execute(
                f"INSERT INTO files ({_FILE_COLUMNS}) SELECT %s, %s, %s, %s, %s, %s, %s "
                "WHERE EXISTS (SELECT 1 FROM sessions WHERE id = %s)",
                (*astuple(info), info.session_id),
            )
        except pg_errors.ForeignKeyViolation:  # its session deleted while the statement ran
            count = 0
        if count == 0:
            raise SessionNotFound(info.session_id)

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None:
        rows = await self.fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE id = %s AND session_id = %s", (file_id, session_id)
        )
        return FileInfo(*rows[0]) if rows else None

    async def list_files(self, session_id: str) -> list[FileInfo]:
        rows = await self.fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE session_id = %s ORDER BY created_at, seq", (session_id,)
        )
        return [FileInfo(*row) for row in rows]

    async def delete_file(self, session_id: str, file_id: str) -> bool:
        return await self.execute("DELETE FROM files WHERE id = %s AND session_id = %s", (file_id, session_id)) > 0


def _start_turn_params(user: Message, assistant: Message, limits: Mapping[str, int], owner: str) -> dict[str, Any]:
    """_START_TURN's parameters."""
    return {
        "session": user.session_id,
        "owner": owner,
        "limits": json.dumps(limits),
        "interaction": user.interaction_id,
        "u_id": user.id,
        "u_content": user.content,
        "u_files": json.dumps(list(user.file_ids)),
        "u_status": user.status,
        "u_at": user.created_at,
        "u_client": user.client_id,
        "a_id": assistant.id,
        "a_content": assistant.content,
        "a_files": json.dumps(list(assistant.file_ids)),
        "a_status": assistant.status,
        "a_at": assistant.created_at,
    }


def _ignore_duration(store: str, seconds: float) -> None:
    pass


def _message(row: Any) -> Message:
    id_, session_id, role, content, file_ids, status, interaction_id, created_at, client_id, parts, usage = row
    files = tuple(file_ids)
    return Message(id_, session_id, role, content, files, status, interaction_id, created_at, client_id, parts, usage)


def _titled(row: Any) -> Session:
    id_, agent, created_at, owner, title, first_text = row
    return Session(id_, agent, created_at, owner, title or derived_title(first_text))
