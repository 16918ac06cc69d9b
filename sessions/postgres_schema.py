"""The PostgreSQL store's schema, as numbered migrations applied in order at start-up.

Each migration is applied once, in one transaction with the row of ``parley_schema`` that records it, under a
transaction-scoped advisory lock: processes that start at once against an empty or an older database wait for
each other, and the second finds the work done. (A transaction-scoped lock, not a session-scoped one: it is
released at the commit even when a pooler such as PgBouncer hands the connection to someone else next.)

Add a migration by appending to :data:`MIGRATIONS`; never edit one that has shipped.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

# Any fixed 64-bit number, the same in every parley: "parley" in ASCII.
LOCK_KEY = 0x7061726C6579

# Timestamps are kept as the ISO 8601 text the API returns (to the microsecond, "Z"), as the other stores keep
# them: what was stored is returned exactly, and the text sorts as the time does. The seq columns order rows
# made within one microsecond, as SQLite's rowid does.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: sessions, messages, files' records and files' bytes.
    (
        """CREATE TABLE sessions (
            id text PRIMARY KEY,
            agent text NOT NULL,
            created_at text NOT NULL,
            owner text NOT NULL DEFAULT '',
            seq bigint GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX sessions_by_owner ON sessions (owner, created_at DESC, seq DESC)",
        """CREATE TABLE messages (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            role text NOT NULL,
            content text NOT NULL,
            file_ids jsonb NOT NULL,
            status text NOT NULL,
            interaction_id text NOT NULL,
            created_at text NOT NULL
        )""",
        "CREATE INDEX messages_by_session ON messages (session_id, seq)",
        "CREATE INDEX messages_streaming ON messages (session_id) WHERE status = 'streaming'",
        """CREATE TABLE files (
            id text PRIMARY KEY,
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            filename text NOT NULL,
            mime_type text NOT NULL,
            size bigint NOT NULL,
            sha256 text NOT NULL,
            created_at text NOT NULL,
            seq bigint GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX files_by_session ON files (session_id, created_at, seq)",
        # Files' bytes, in rows of at most a chunk each (see sessions/postgres_blobs.py). A blob is visible to the
        # API only through its file's record; one without a record (a partial upload, or one whose record went
        # with its session) is swept after a while.
        """CREATE TABLE blobs (
            id text PRIMARY KEY,
            touched_at timestamptz NOT NULL DEFAULT now(),
            size bigint,
            sha256 text
        )""",
        """CREATE TABLE blob_chunks (
            blob_id text NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (blob_id, seq)
        )""",
    ),
    # 2: sessions' titles (NULL: the first user message's), and the ids clients give their messages (the AI SDK's).
    (
        "ALTER TABLE sessions ADD COLUMN title text",
        "ALTER TABLE messages ADD COLUMN client_id text NOT NULL DEFAULT ''",
    ),
)


async def migrate(connection: AsyncConnection[Any]) -> list[int]:
    """Bring the database's schema up to date; return the versions this call applied (none when another
    process did it first). The connection must be in autocommit mode (each call is its own transaction)."""
    applied: list[int] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS parley_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await connection.execute("SELECT coalesce(max(version), 0) FROM parley_schema")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in statements:
                await connection.execute(statement)
            await connection.execute("INSERT INTO parley_schema (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied


async def version(connection: AsyncConnection[Any]) -> int:
    """The schema version the database is at (0: none yet)."""
    cursor = await connection.execute("SELECT to_regclass('parley_schema') IS NOT NULL")
    row = await cursor.fetchone()
    if not row or not row[0]:
        return 0
    cursor = await connection.execute("SELECT coalesce(max(version), 0) FROM parley_schema")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0
