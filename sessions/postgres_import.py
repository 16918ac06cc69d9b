"""Move an SQLite store's history into PostgreSQL:

    python -m parley.sessions.postgres_import ./data/parley.db [--files ./data/files] [--database-url URL]

The database is ``--database-url`` or ``PARLEY_DATABASE_URL``; its schema is brought up to date first. Sessions
(with their owners and titles), messages (in their order, with their clients' ids, parts and usage) and files'
records are copied, each session in one transaction; with ``--files`` (by
default the ``files`` directory beside the SQLite file, when there is one), files' bytes too, chunk by chunk. A
session whose id the database already has is left as it is there, so the command may be run again after a
partial run. The SQLite file is only read. Run it with parley stopped (or idle): a turn still ``streaming`` in
the file is copied as ``interrupted``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg

from parley.sessions.postgres_blobs import CHUNK_BYTES
from parley.sessions.postgres_schema import migrate

_MESSAGES = "id, session_id, role, content, file_ids, status, interaction_id, created_at, client_id, parts, usage"
_FILES = "id, session_id, filename, mime_type, size, sha256, created_at"


async def run(sqlite_path: Path, url: str, files: Path | None) -> dict[str, int]:
    """Copy; return how many sessions were copied and skipped, and how many messages and files came with them."""
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    counts = {"sessions copied": 0, "sessions already there": 0, "messages": 0, "files": 0, "file bytes": 0}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
        await migrate(connection)
        # A file from an older parley lacks the later columns: each reads as what the store reads for it
        # (no owner: open mode's ''; no title: derived from the first message; no client id; no parts: text alone).
        session_columns = {row[1] for row in source.execute("PRAGMA table_info(sessions)")}
        message_columns = {row[1] for row in source.execute("PRAGMA table_info(messages)")}
        owner = "owner" if "owner" in session_columns else "''"
        title = "title" if "title" in session_columns else "NULL"
        read = _MESSAGES if "client_id" in message_columns else _MESSAGES.replace("client_id", "''")
        read = read if "parts" in message_columns else read.replace("parts, usage", "NULL, NULL")
        sessions = source.execute(
            f"SELECT id, agent, created_at, {owner}, {title} FROM sessions ORDER BY rowid"
        ).fetchall()
        for session in sessions:
            async with connection.transaction():
                cursor = await connection.execute(
                    "INSERT INTO sessions (id, agent, created_at, owner, title) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING RETURNING 1",
                    session,
                )
                if await cursor.fetchone() is None:
                    counts["sessions already there"] += 1
                    continue
                counts["sessions copied"] += 1
                messages = source.execute(
                    f"SELECT {read} FROM messages WHERE session_id = ? ORDER BY seq", (session[0],)
                ).fetchall()
                async with connection.cursor() as many:
                    await many.executemany(
                        f"INSERT INTO messages ({_MESSAGES}) "
                        "VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s::jsonb, %s::jsonb)",
                        [_message(row) for row in messages],
                    )
                counts["messages"] += len(messages)
                for record in source.execute(
                    f"SELECT {_FILES} FROM files WHERE session_id = ? ORDER BY created_at, rowid", (session[0],)
                ).fetchall():
                    await connection.execute(
                        f"INSERT INTO files ({_FILES}) VALUES (%s, %s, %s, %s, %s, %s, %s)", record
                    )
                    counts["files"] += 1
                    if files is not None:
                        counts["file bytes"] += await _copy_bytes(connection, files / record[0], record)
    source.close()
    return counts


def _message(row: tuple[Any, ...]) -> tuple[Any, ...]:
    status = "interrupted" if row[5] == "streaming" else row[5]
    return (*row[:4], json.dumps(json.loads(row[4])), status, *row[6:])


async def _copy_bytes(connection: psycopg.AsyncConnection[Any], path: Path, record: tuple[Any, ...]) -> int:
    if not await anyio.Path(path).is_file():
        return 0  # a record whose bytes were lost: it is copied as it is, and its download answers 404
    await connection.execute("INSERT INTO blobs (id) VALUES (%s)", (record[0],))
    size, seq = 0, 0
    async with await anyio.open_file(path, "rb") as blob:
        while chunk := await blob.read(CHUNK_BYTES):
            await connection.execute(
                "INSERT INTO blob_chunks (blob_id, seq, data) VALUES (%s, %s, %s)", (record[0], seq, chunk)
            )
            size, seq = size + len(chunk), seq + 1
    await connection.execute("UPDATE blobs SET size = %s, sha256 = %s WHERE id = %s", (size, record[5], record[0]))
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parley.sessions.postgres_import",
        description="Copy an SQLite store's sessions, history and files into PostgreSQL.",
    )
    parser.add_argument("sqlite_file", type=Path, help="the SQLite store, e.g. ./data/parley.db")
    parser.add_argument("--database-url", default=os.environ.get("PARLEY_DATABASE_URL"), help="PARLEY_DATABASE_URL")
    parser.add_argument("--files", type=Path, help="its files' directory (default: 'files' beside the SQLite file)")
    options = parser.parse_args(argv)
    if not options.database_url:
        parser.error("give --database-url or set PARLEY_DATABASE_URL")
    if not options.sqlite_file.is_file():
        parser.error(f"no such file: {options.sqlite_file}")
    files = options.files or options.sqlite_file.parent / "files"
    try:
        counts = anyio.run(run, options.sqlite_file, options.database_url, files if files.is_dir() else None)
    except (psycopg.Error, sqlite3.Error) as exc:
        print(f"parley: import failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(", ".join(f"{name}: {count}" for name, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
