from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from parley.sessions.errors import EditWithoutText, MessageNotFound, SessionExists, SessionNotFound
from parley.sessions.parts import Part, stored
from parley.sessions.store import FileInfo, Message, MessageStatus, Session, derived_title, ignore_error

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    created_at TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    title TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    file_ids TEXT NOT NULL,
    status TEXT NOT NULL,
    interaction_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    client_id TEXT NOT NULL DEFAULT '',
    parts TEXT,
    usage TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, seq);
CREATE INDEX IF NOT EXISTS messages_streaming ON messages(status) WHERE status = 'streaming';
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_session ON files(session_id, created_at);
"""

# Files made before sessions had owners: theirs become the open owner's ('', auth.OPEN_OWNER). Run after
# _SCHEMA, in a write transaction, so that two workers opening one old file do not both add the column.
_OWNERS = "ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''"
_OWNERS_INDEX = "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, created_at)"
# Files made before sessions had titles (NULL: derived from the first user message).
_TITLES = "ALTER TABLE sessions ADD COLUMN title TEXT"
# ... and before clients named their messages (the AI SDK does).
_CLIENT_IDS = "ALTER TABLE messages ADD COLUMN client_id TEXT NOT NULL DEFAULT ''"
# ... and before messages had parts and usage: NULL in both is a message of text alone with no usage (see
# sessions/store.py's Message), which is what every message of theirs is.
_PARTS = ("ALTER TABLE messages ADD COLUMN parts TEXT", "ALTER TABLE messages ADD COLUMN usage TEXT")
_SESSION_COLUMNS = "id, agent, created_at, owner"
# A session with its title: the one set, or the start of its first user message (derived_title cuts it to 80
# characters after folding whitespace, so a few hundred are plenty).
_TITLED_COLUMNS = (
    "id, agent, created_at, owner, title, (SELECT substr(content, 1, 1000) FROM messages "
    "WHERE messages.session_id = sessions.id AND role = 'user' ORDER BY seq LIMIT 1)"
)

_TEXT_COLUMNS = "id, session_id, role, content, file_ids, status, interaction_id, created_at, client_id"
_MESSAGE_COLUMNS = f"{_TEXT_COLUMNS}, parts, usage"
_FILE_COLUMNS = "id, session_id, filename, mime_type, size, sha256, created_at"
_ROW = "(" + ", ".join("?" * 11) + ")"
_INSERT_TURN = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES {_ROW}, {_ROW}"
_INSERT_REPLY = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES {_ROW}"
# Messages of text alone (most are) leave parts and usage to their default, and a reply that ends as text alone
# sets them to NULL in the statement: Python's sqlite3 looks up an adapter for every None it binds (two attribute
# lookups that fail, ~3,000 instructions, several times a string's cost), and a chat would bind six.
_TEXT_ROW = "(" + ", ".join("?" * 9) + ")"
_INSERT_TEXT_TURN = f"INSERT INTO messages ({_TEXT_COLUMNS}) VALUES {_TEXT_ROW}, {_TEXT_ROW}"
_FINISH = "UPDATE messages SET content = ?, status = ?, parts = ?, usage = ? WHERE id = ? AND status = 'streaming'"
_FINISH_TEXT = (
    "UPDATE messages SET content = ?, status = ?, parts = NULL, usage = NULL WHERE id = ? AND status = 'streaming'"
)
_CHECKPOINT = "UPDATE messages SET content = ?, parts = ?, usage = ? WHERE id = ? AND status = 'streaming'"
_CHECKPOINT_TEXT = "UPDATE messages SET content = ?, parts = NULL, usage = NULL WHERE id = ? AND status = 'streaming'"
_SELECT_SESSION = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND owner = ?"
# A message as the API names it: by its client's id, or by its own when it has none.
_FIND = (
    f"SELECT seq, {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? "
    "AND (client_id = ? OR (client_id = '' AND id = ?)) ORDER BY seq DESC LIMIT 1"
)


class _Operation:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


def _enter_wal(db: sqlite3.Connection, patience: float = 5.0) -> None:
    """Switch a new connection to WAL. Two processes opening a new file at once (``uvicorn --workers`` on one
    data directory) can make the switch fail at once with "database is locked": SQLite does not call the busy
    handler for it, so retry it for as long as the busy timeout would have waited."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # (in the store's thread, not the event loop's)


class SQLiteStore:
    """The embedded store: one SQLite file (WAL), every query run off the event loop, in a worker thread.

    Operations that arrive while the thread is busy wait, then run together in one transaction (one that
    fails does not undo the others, because each operation writes with one statement at most, which is
    atomic by itself): under load, many chats share one thread hop and one commit.
    ``path=":memory:"`` keeps everything in memory for the life of the process.
    """

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._open_lock = anyio.Lock()
        self._queue: list[_Operation] = []
        self._flushing = False
        self._batch_finished = anyio.Event()

    async def open(self) -> None:
        async with self._open_lock:
            if self._db is None:
                self._db = await anyio.to_thread.run_sync(self._connect, limiter=self._limiter)

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        _enter_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            if "owner" not in columns:
                db.execute(_OWNERS)
            if "title" not in columns:
                db.execute(_TITLES)
            message_columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            if "client_id" not in message_columns:
                db.execute(_CLIENT_IDS)
            if "parts" not in message_columns:
                for statement in _PARTS:
                    db.execute(statement)
            db.execute(_OWNERS_INDEX)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return db

    async def close(self) -> None:
        async with self._open_lock:
            if self._db is not None:
                db, self._db = self._db, None
                await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the store's thread, in a transaction shared with other operations: ``fn`` may
        read as it likes but must write with one statement at most (a failed operation is not undone)."""
        if self._db is None:
            await self.open()
        operation = _Operation(fn)
        self._queue.append(operation)
        while not operation.done:
            if self._flushing:
                await self._batch_finished.wait()
                continue
            # This caller runs one batch: everything queued now, its own operation included. Then the
            # waiters wake, and one whose operation is still queued runs the next. (A caller that kept
            # flushing while others queued up would never get back to its own request under load.)
            # Shielded: the others wait on it, and a write that has begun is finished anyway.
            self._flushing = True
            try:
                with anyio.CancelScope(shield=True):
                    # Let the tasks that are ready right now queue their work too: a thread hop costs more
                    # than the store's work itself (the GIL changes hands twice), so fewer, fuller batches.
                    await anyio.lowlevel.checkpoint()
                    batch, self._queue = self._queue, []
                    await anyio.to_thread.run_sync(self._run_batch, batch, limiter=self._limiter)
                    for queued in batch:
                        queued.done = True
            finally:
                self._flushing = False
                finished, self._batch_finished = self._batch_finished, anyio.Event()
                finished.set()
        if operation.error is not None:
            if isinstance(operation.error, sqlite3.Error):
                self.on_error(self.name)
            raise operation.error
        return operation.result  # type: ignore[no-any-return]

    def _run_batch(self, batch: list[_Operation]) -> None:
        db = self._db
        if db is None:
            for operation in batch:
                operation.error = RuntimeError("the store is closed")
            return
        try:
            # IMMEDIATE: take the write lock now. A deferred transaction that read first could not write
            # later if another process (a worker sharing the file) had committed meanwhile.
            db.execute("BEGIN IMMEDIATE")
            for operation in batch:
                try:
                    operation.result = operation.fn(db)
                except Exception as exc:
                    operation.error = exc
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for operation in batch:
                operation.error = operation.error or exc

    # sessions

    async def create_session(self, session: Session) -> None:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}, title) VALUES (?, ?, ?, ?, ?)",
                    (session.ui_session_id, session.agent, session.created_at, session.owner, session.title),
                )
            except sqlite3.IntegrityError:
                raise SessionExists(session.ui_session_id) from None

        await self._run(insert)

    async def get_session(self, session_id: str, owner: str) -> Session | None:
        def select(db: sqlite3.Connection) -> Session | None:
            row = db.execute(
                f"SELECT {_TITLED_COLUMNS} FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
            return _titled(row) if row else None

        return await self._run(select)

    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        def select(db: sqlite3.Connection) -> list[Session]:
            rows = db.execute(
                f"SELECT {_TITLED_COLUMNS} FROM sessions WHERE owner = ? "
                "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
            return [_titled(row) for row in rows]

        return await self._run(select)

    async def set_title(self, session_id: str, owner: str, title: str | None) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute("UPDATE sessions SET title = ? WHERE id = ? AND owner = ?", (title, session_id, owner))
            return cursor.rowcount > 0

        return await self._run(update)

    async def delete_session(self, session_id: str, owner: str) -> list[str] | None:
        def delete(db: sqlite3.Connection) -> list[str] | None:
            file_ids = [row[0] for row in db.execute("SELECT id FROM files WHERE session_id = ?", (session_id,))]
            if db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)).rowcount == 0:
                return None
            return file_ids  # (their rows went with the session: ON DELETE CASCADE)

        return await self._run(delete)

    # history

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], *, owner: str
    ) -> tuple[Session, list[Message]]:
        def insert(db: sqlite3.Connection) -> tuple[Session, list[Message]]:
            session = _session(db, user.session_id, owner)
            if session is None:
                raise SessionNotFound(user.session_id)
            limit = history_limit(session)
            history = _history(db, user.session_id, limit) if limit > 0 else []
            # One statement: both rows or neither. (The batch's transaction holds the write lock from its start,
            # so no other process can delete the session between the select and this.)
            _insert_turn(db, user, assistant)
            return session, history

        return await self._run(insert)

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
        def replace(db: sqlite3.Connection) -> tuple[Session, list[Message], Message]:
            session_id = user.session_id
            session = _session(db, session_id, owner)
            if session is None:
                raise SessionNotFound(session_id)
            limit = history_limit(session)
            found = db.execute(_FIND, (session_id, target, target)).fetchone()
            if found is None:
                if not missing_ok:
                    raise MessageNotFound(target)
                history = _history(db, session_id, limit) if limit > 0 else []
                _insert_turn(db, user, assistant)
                return session, history, user
            cut, asked = found[0], user
            if found[3] == "assistant":  # a regenerate: the reply goes, the user message before it stays
                before = db.execute(
                    f"SELECT seq, {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq < ? AND role = 'user' "
                    "ORDER BY seq DESC LIMIT 1",
                    (session_id, cut),
                ).fetchone()
                if before is None:
                    raise MessageNotFound(target)
                start, asked = before[0], _message(before[1:])
            elif keep:  # a regenerate from the user message: it stays, what follows it goes
                start, asked, cut = cut, _message(found[1:]), cut + 1
            else:  # an edit
                if not user.content.strip():
                    raise EditWithoutText()
                start = cut
            history = _history_before(db, session_id, start, limit) if limit > 0 else []
            # Two statements, in a savepoint of their own: both or neither, whatever else the batch does.
            db.execute("SAVEPOINT replace_turn")
            try:
                db.execute("DELETE FROM messages WHERE session_id = ? AND seq >= ?", (session_id, cut))
                if asked is user:
                    _insert_turn(db, user, assistant)
                else:
                    db.execute(_INSERT_REPLY, _message_row(assistant))
            except BaseException:
                db.execute("ROLLBACK TO replace_turn")
                raise
            finally:
                db.execute("RELEASE replace_turn")
            return session, history, asked

        return await self._run(replace)

    async def finish_turn(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        # (A final record never changes: a reply recorded interrupted meanwhile keeps its text.)
        row: tuple[str | None, ...] = (content, status, message_id)
        statement = _FINISH_TEXT
        if parts is not None or usage is not None:
            statement, row = _FINISH, (content, status, stored(parts), stored(usage), message_id)

        def update(db: sqlite3.Connection) -> None:
            db.execute(statement, row)

        await self._run(update)

    async def checkpoint_turns(
        self,
        contents: Mapping[str, str],
        parts: Mapping[str, Sequence[Part]] | None = None,
        usages: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        parts, usages = parts or {}, usages or {}
        # Replies of text alone (most are) bind no None for their parts and usage (see _FINISH_TEXT): a tick over
        # thousands of streaming replies would look up an adapter for each.
        texts = [(content, message_id) for message_id, content in contents.items()
                 if message_id not in parts and message_id not in usages]  # fmt: skip
        rows = [
            (content, stored(parts.get(message_id)), stored(usages.get(message_id)), message_id)
            for message_id, content in contents.items()
            if message_id in parts or message_id in usages
        ]

        def update(db: sqlite3.Connection) -> None:
            # Several statements, unlike the other operations: one that fails leaves the others' rows written,
            # which is harmless here (each row is the text so far of one reply; the next checkpoint writes it anew).
            db.executemany(_CHECKPOINT_TEXT, texts)
            db.executemany(_CHECKPOINT, rows)

        await self._run(update)

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        def update(db: sqlite3.Connection) -> int:
            if session_id is None:
                cursor = db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
            else:
                cursor = db.execute(
                    "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND session_id = ?",
                    (session_id,),
                )
            return cursor.rowcount

        return await self._run(update)

    async def streaming_turn(self, session_id: str) -> str | None:
        def select(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT interaction_id FROM messages WHERE status = 'streaming' AND session_id = ? "
                "ORDER BY seq DESC LIMIT 1",
                (session_id,),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._run(select)

    async def list_messages(self, session_id: str) -> list[Message]:
        return await self._run(lambda db: _history(db, session_id))

    # files

    async def add_file(self, info: FileInfo) -> None:
        def insert(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                f"INSERT INTO files ({_FILE_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?)",
                (*astuple(info), info.session_id),
            )
            if cursor.rowcount == 0:
                raise SessionNotFound(info.session_id)

        await self._run(insert)

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None:
        def select(db: sqlite3.Connection) -> FileInfo | None:
            row = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ? AND session_id = ?", (file_id, session_id)
            ).fetchone()
            return FileInfo(*row) if row else None

        return await self._run(select)

    async def list_files(self, session_id: str) -> list[FileInfo]:
        def select(db: sqlite3.Connection) -> list[FileInfo]:
            rows = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE session_id = ? ORDER BY created_at, rowid", (session_id,)
            ).fetchall()
            return [FileInfo(*row) for row in rows]

        return await self._run(select)

    async def delete_file(self, session_id: str, file_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            cursor = db.execute("DELETE FROM files WHERE id = ? AND session_id = ?", (file_id, session_id))
            return cursor.rowcount > 0

        return await self._run(delete)


def _session(db: sqlite3.Connection, session_id: str, owner: str) -> Session | None:
    row = db.execute(_SELECT_SESSION, (session_id, owner)).fetchone()
    return Session(*row) if row else None


def _insert_turn(db: sqlite3.Connection, user: Message, assistant: Message) -> None:
    """A turn's two messages, in one statement: both rows or neither."""
    if user.parts is None and user.usage is None and assistant.parts is None and assistant.usage is None:
        db.execute(_INSERT_TEXT_TURN, (*_message_row(user)[:9], *_message_row(assistant)[:9]))
    else:
        db.execute(_INSERT_TURN, (*_message_row(user), *_message_row(assistant)))


def _titled(row: tuple[Any, ...]) -> Session:
    id_, agent, created_at, owner, title, first_text = row
    return Session(id_, agent, created_at, owner, title or derived_title(first_text))


def _history(db: sqlite3.Connection, session_id: str, limit: int = -1) -> list[Message]:
    rows = db.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?", (session_id, limit)
    ).fetchall()
    return [_message(row) for row in reversed(rows)]


def _history_before(db: sqlite3.Connection, session_id: str, seq: int, limit: int) -> list[Message]:
    rows = db.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        (session_id, seq, limit),
    ).fetchall()
    return [_message(row) for row in reversed(rows)]


def _message_row(message: Message) -> tuple[Any, ...]:
    return (
        message.id,
        message.session_id,
        message.role,
        message.content,
        json.dumps(list(message.file_ids)) if message.file_ids else "[]",  # (most messages name no file)
        message.status,
        message.interaction_id,
        message.created_at,
        message.client_id,
        stored(message.parts),
        stored(message.usage),
    )


def _message(row: tuple[Any, ...]) -> Message:
    id_, session_id, role, content, file_ids, status, interaction_id, created_at, client_id, parts, usage = row
    return Message(
        id_,
        session_id,
        role,
        content,
        tuple(json.loads(file_ids)),
        status,
        interaction_id,
        created_at,
        client_id,
        json.loads(parts) if parts is not None else None,
        json.loads(usage) if usage is not None else None,
    )
