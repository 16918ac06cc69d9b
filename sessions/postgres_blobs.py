"""Uploaded files' bytes in PostgreSQL, beside their records, so that the hosts serving one database share no disk.

A blob is a row of ``blobs`` and its bytes are rows of ``blob_chunks``, :data:`CHUNK_BYTES` each. Chunked rows
rather than large objects: they go with their blob (``ON DELETE CASCADE``) where a large object must be unlinked
on its own or be left behind, they are plain rows to ``pg_dump``, logical replication and PgBouncer's
transaction pooling (a large object is read through a descriptor that lives in one transaction), and a chunk
is read or written with one ordinary statement that holds a connection for just that long.

An upload is written as it arrives, one chunk per statement; a download is read one chunk per statement; so
neither keeps more than a chunk in memory, nor a connection while the client is slow. Until ``commit``, a blob
has no size and is not served; a blob with no file record (an upload its process did not finish, or one whose
record went with its session) is swept once it is untouched for a while.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from parley.sessions.errors import FileNotFound
from parley.sessions.files import Blob, BlobWriter, FileTooLarge, Recorded
from parley.sessions.postgres import PostgresStore

CHUNK_BYTES = 256 * 1024

_ADD_CHUNK = """
WITH touched AS (UPDATE blobs SET touched_at = now() WHERE id = %(blob)s)
INSERT INTO blob_chunks (blob_id, seq, data) VALUES (%(blob)s, %(seq)s, %(data)s)
"""

_SWEEP = """
DELETE FROM blobs WHERE touched_at < now() - make_interval(secs => %s)
AND NOT EXISTS (SELECT 1 FROM files WHERE files.id = blobs.id)
"""


class PostgresBlobs:
    """Files' bytes in the PostgreSQL store's database (its pool, its errors: StoreUnavailable when it is down)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def open(self) -> None:
        await self.store.open()  # (the schema, blobs' tables included)

    async def sweep_partials(self, max_age: float, recorded: Recorded | None = None) -> None:
        while True:
            await anyio.sleep(max_age / 2)
            try:
                await self.store.execute(_SWEEP, (max_age,))
            except Exception:  # PostgreSQL down: the next sweep does it
                pass

    async def settle(self, file_id: str) -> None:
        pass  # (DiskBlobs' sweep of blobs without a record; not done here)

    def close(self) -> None:
        pass  # (the store's pool is closed with the store)

    @asynccontextmanager
    async def writer(self, file_id: str, limit: int) -> AsyncIterator[BlobWriter]:
        writer = PostgresBlobWriter(self.store, file_id, limit)
        try:
            yield writer
        finally:
            if not writer.committed and writer.started:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.delete(file_id)
                    except Exception:  # PostgreSQL down: left for the sweeper
                        pass

    async def delete(self, file_id: str) -> None:
        await self.store.execute("DELETE FROM blobs WHERE id = %s", (file_id,))

    async def _chunk_count(self, file_id: str) -> int:
        rows = await self.store.fetch(
            "SELECT (SELECT count(*) FROM blob_chunks WHERE blob_id = id) FROM blobs "
            "WHERE id = %s AND size IS NOT NULL",
            (file_id,),
        )
        if not rows:
            raise FileNotFound(file_id)  # deleted since its record was read
        return int(rows[0][0])

    async def read_text(self, file_id: str) -> str:
        await self._chunk_count(file_id)
        rows = await self.store.fetch("SELECT data FROM blob_chunks WHERE blob_id = %s ORDER BY seq", (file_id,))
        return b"".join(row[0] for row in rows).decode("utf-8", errors="replace")

    async def content(self, file_id: str) -> Path | AsyncIterator[bytes]:
        return self._chunks(file_id, await self._chunk_count(file_id))

    async def _chunks(self, file_id: str, count: int) -> AsyncIterator[bytes]:
        for seq in range(count):
            rows = await self.store.fetch(
                "SELECT data FROM blob_chunks WHERE blob_id = %s AND seq = %s", (file_id, seq)
            )
            if not rows:
                return  # deleted meanwhile: the response ends short, and the client sees it did
            yield bytes(rows[0][0])


class PostgresBlobWriter:
    def __init__(self, store: PostgresStore, file_id: str, limit: int) -> None:
        self.store = store
        self.file_id = file_id
        self.limit = limit
        self.size = 0
        self.started = False
        self.committed = False
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self._seq = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise FileTooLarge
        self._hash.update(data)
        self._pending += data
        while len(self._pending) >= CHUNK_BYTES:
            chunk = bytes(self._pending[:CHUNK_BYTES])
            del self._pending[:CHUNK_BYTES]
            await self._flush(chunk)

    async def _start(self) -> None:
        if not self.started:
            await self.store.execute("INSERT INTO blobs (id) VALUES (%s)", (self.file_id,))
            self.started = True

    async def _flush(self, chunk: bytes) -> None:
        await self._start()
        await self.store.execute(_ADD_CHUNK, {"blob": self.file_id, "seq": self._seq, "data": chunk})
        self._seq += 1

    async def commit(self, session_id: str = "") -> Blob:
        await self._start()
        if self._pending:
            chunk, self._pending = bytes(self._pending), bytearray()
            await self._flush(chunk)
        digest = self._hash.hexdigest()
        await self.store.execute(
            "UPDATE blobs SET size = %s, sha256 = %s WHERE id = %s", (self.size, digest, self.file_id)
        )
        self.committed = True
        return Blob(self.size, digest)
