from __future__ import annotations

import functools
import hashlib
import logging
import mimetypes
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import anyio
import anyio.to_thread
from anyio import AsyncFile

from parley.sessions.errors import FileNotFound

logger = logging.getLogger("parley")

_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_TEXT_TYPES = {
    "application/json",
    "application/xml",
    "application/javascript",
    "application/x-javascript",
    "application/x-yaml",
    "application/yaml",
    "application/toml",
    "application/x-sh",
    "application/sql",
    "application/x-python",
    "application/x-httpd-php",
}
_TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".conf", ".log", ".html", ".htm", ".css", ".py", ".js", ".mjs", ".ts", ".tsx", ".jsx",
    ".java", ".kt", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".sh",
    ".bash", ".sql", ".r", ".scala", ".lua", ".pl", ".hs", ".ex", ".exs", ".erl", ".clj", ".vue", ".svelte",
}  # fmt: skip
MAX_FILENAME = 255
PARTIAL_MAX_AGE = 3600.0


def safe_filename(raw: str) -> str:
    """The client's filename as metadata only: no path parts, no control characters, a sane length."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if not unicodedata.category(ch).startswith("C")).strip()
    if name in {"", ".", ".."}:
        return "file"
    if len(name) > MAX_FILENAME:
        stem, dot, suffix = name.rpartition(".")
        keep = f".{suffix}" if dot and stem and len(suffix) <= 16 else ""
        name = name[: MAX_FILENAME - len(keep)] + keep
    return name


def mime_type(declared: str | None, filename: str) -> str:
    declared = (declared or "").split(";")[0].strip().lower()
    if _MIME.fullmatch(declared) and declared != "application/octet-stream":
        return declared
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def is_text(mime: str, filename: str) -> bool:
    return mime.startswith("text/") or mime in _TEXT_TYPES or Path(filename).suffix.lower() in _TEXT_SUFFIXES


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\;' else "_" for ch in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class FileTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Blob:
    size: int
    sha256: str


# Whether a file has its record in the store: (session id, file id) -> bool.
Recorded = Callable[[str, str], Awaitable[bool]]


class BlobWriter(Protocol):
    """Writes one upload chunk by chunk, counting and hashing as it goes; raises FileTooLarge past its limit."""

    size: int

    async def write(self, data: bytes) -> None: ...

    async def commit(self, session_id: str = "") -> Blob:
        """Make the blob whole, for ``session_id``'s record (then :meth:`Blobs.settle` it)."""


class Blobs(Protocol):
    """Where uploaded files' bytes live; their records live in the store. One is chosen at start-up:
    :class:`DiskBlobs` (a directory) or :class:`sessions.postgres_blobs.PostgresBlobs` (rows in the database, so
    that hosts share no disk). Neither ever holds a whole file in memory, but for :meth:`read_text`."""

    async def open(self) -> None: ...

    async def sweep_partials(self, max_age: float, recorded: Recorded | None = None) -> None:
        """Until cancelled, remove now and then what uploads of a killed process left, untouched for ``max_age``
        (with ``recorded``: blobs committed whose record was never stored, too)."""

    async def settle(self, file_id: str) -> None:
        """The blob's record is stored: it is no longer a candidate for the sweep."""

    def close(self) -> None: ...

    def writer(self, file_id: str, limit: int) -> AbstractAsyncContextManager[BlobWriter]:
        """A writer for a new blob; unless ``commit`` ran, whatever it wrote is removed at the end."""

    async def delete(self, file_id: str) -> None: ...

    async def read_text(self, file_id: str) -> str:
        """The whole blob as text (for an agent); NotFound if it is gone."""

    async def content(self, file_id: str) -> Path | AsyncIterator[bytes]:
        """The blob for a download: a local file's path, or its bytes chunk by chunk. NotFound if it is gone."""


class DiskBlobs:
    """Uploaded files' bytes on disk, one file per id under ``root``; metadata lives in the store.

    A blob is written under ``root/.partial`` and moved into place only once it is whole, so a crash or a
    cancelled upload never leaves a file the API can see. Its record is stored after that move: until it is, a
    note in ``root/.unrecorded`` names its session, so that the blob of a process killed in between is removed
    (see :meth:`sweep_partials`).
    """

    def __init__(self, root: str | Path | None) -> None:
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            # PARLEY_DATA_DIR=:memory: keeps blobs in a temporary directory, removed at shutdown.
            self._temporary = tempfile.TemporaryDirectory(prefix="parley-files-")
            root = self._temporary.name
        self.root = Path(root)
        self._partial = self.root / ".partial"
        self._unrecorded = self.root / ".unrecorded"

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._prepare)

    def _prepare(self) -> None:
        self._partial.mkdir(parents=True, exist_ok=True)
        self._unrecorded.mkdir(exist_ok=True)
        self._sweep(PARTIAL_MAX_AGE)

    async def sweep_partials(self, max_age: float, recorded: Recorded | None = None) -> None:
        """Remove, every ``max_age / 2`` seconds and until cancelled, the partial uploads untouched for
        ``max_age``: those of a process that was killed. (A live upload writes to its file as its body
        arrives, and a body that stalls is dropped after PARLEY_BODY_TIMEOUT_SECONDS.) With ``recorded``, also
        the blobs whose record was still not stored ``max_age`` after they were committed: their process was
        killed in between (a live upload stores it right after, in one store call)."""
        while True:
            await anyio.sleep(max_age / 2)
            await anyio.to_thread.run_sync(self._sweep, max_age)
            if recorded is not None:
                await self._sweep_unrecorded(max_age, recorded)

    async def _sweep_unrecorded(self, max_age: float, recorded: Recorded) -> None:
        cutoff = time.time() - max_age
        notes = await anyio.to_thread.run_sync(
            lambda: [(n.name, n.read_text()) for n in self._unrecorded.glob("file_*") if n.stat().st_mtime < cutoff]
        )
        for file_id, session_id in notes:
            try:
                if not await recorded(session_id, file_id):
                    await anyio.to_thread.run_sync(functools.partial(self.path(file_id).unlink, missing_ok=True))
            except Exception as exc:  # the store is down: the next sweep asks again
                logger.warning("could not sweep the blobs left without a record: %s", exc)
                return
            await self.settle(file_id)

    async def settle(self, file_id: str) -> None:
        await anyio.to_thread.run_sync(lambda: (self._unrecorded / file_id).unlink(missing_ok=True))

    def _sweep(self, max_age: float) -> int:
        # Recent ones may belong to another worker still receiving them.
        cutoff = time.time() - max_age
        removed = 0
        for leftover in self._partial.glob("*.part"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # committed or discarded meanwhile
        return removed

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    @asynccontextmanager
    async def writer(self, file_id: str, limit: int) -> AsyncIterator[BlobWriter]:
        writer = DiskBlobWriter(self._partial / f"{file_id}.part", self.path(file_id), limit, self._unrecorded)
        try:
            yield writer
        finally:
            await writer.discard()

    async def delete(self, file_id: str) -> None:
        await anyio.to_thread.run_sync(lambda: self.path(file_id).unlink(missing_ok=True))
        await self.settle(file_id)

    async def read_text(self, file_id: str) -> str:
        try:
            data = await anyio.Path(self.path(file_id)).read_bytes()
        except FileNotFoundError:
            raise FileNotFound(file_id) from None  # deleted since its metadata was read
        return data.decode("utf-8", errors="replace")

    async def content(self, file_id: str) -> Path | AsyncIterator[bytes]:
        path = self.path(file_id)
        if not await anyio.Path(path).is_file():
            raise FileNotFound(file_id)
        return path


class DiskBlobWriter:
    """Writes one upload to disk chunk by chunk, counting and hashing as it goes; nothing is kept in memory."""

    def __init__(self, partial: Path, destination: Path, limit: int, unrecorded: Path | None = None) -> None:
        self.partial = partial
        self.destination = destination
        self.unrecorded = unrecorded
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: AsyncFile[bytes] | None = None

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise FileTooLarge
        if self._file is None:
            # Unbuffered: each chunk reaches the file as it arrives, so its mtime says the upload is alive.
            self._file = await anyio.open_file(self.partial, "wb", buffering=0)
        self._hash.update(data)
        view = memoryview(data)
        while view:  # (a raw file may take part of a write)
            view = view[await self._file.write(view) :]

    async def commit(self, session_id: str = "") -> Blob:
        if self._file is None:
            self._file = await anyio.open_file(self.partial, "wb")
        await self._file.aclose()
        await anyio.to_thread.run_sync(self._move_into_place, session_id)
        return Blob(self.size, self._hash.hexdigest())

    def _move_into_place(self, session_id: str) -> None:
        if self.unrecorded is not None and session_id:
            (self.unrecorded / self.destination.name).write_text(session_id)  # (before: a kill may come between)
        os.replace(self.partial, self.destination)

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._file is not None:
                await self._file.aclose()
            await anyio.to_thread.run_sync(lambda: self.partial.unlink(missing_ok=True))
