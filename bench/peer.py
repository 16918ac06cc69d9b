"""The peer: what most people would write for the same service, FastAPI with a StreamingResponse and the history
kept the usual way: aiosqlite on one shared connection, in WAL mode like parley, the user's message stored
before the reply and the reply when it ends.

aiosqlite directly rather than SQLAlchemy's async engine: that engine runs on aiosqlite too, so the ORM layer would
only add work on top of the same thread hand-offs, and the peer is meant to be the strongest ordinary rival, not a
handicapped one. It is also one dependency instead of two.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
from fastapi import Body, FastAPI, Form, HTTPException
from fastapi.responses import StreamingResponse

_TOKEN = re.compile(r"\s*\S+\s*|\s+")
DELAY = float(os.environ.get("PARLEY_ECHO_DELAY", "0"))
DATABASE = Path(os.environ.get("PARLEY_DATA_DIR", "./data")) / "peer.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, seq);
"""
db: aiosqlite.Connection


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global db
    DATABASE.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(DATABASE) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.executescript(SCHEMA)
        yield


app = FastAPI(lifespan=lifespan)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


async def _add_message(session_id: str, role: str, content: str) -> None:
    await db.execute(
        "INSERT INTO messages (id, session_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
        (uuid.uuid4().hex, session_id, role, content, _now()),
    )
    await db.commit()


@app.post("/api/v1/sessions", status_code=201)
async def create_session(body: Annotated[dict[str, Any] | None, Body()] = None) -> dict[str, str]:
    session_id = f"ses_{uuid.uuid4().hex}"
    await db.execute("INSERT INTO sessions (id, created_at) VALUES (?, ?)", (session_id, _now()))
    await db.commit()
    return {"ui_session_id": session_id}


@app.post("/api/v1/chat")
async def chat(ui_session_id: Annotated[str, Form()], message: Annotated[str, Form()]) -> StreamingResponse:
    async with db.execute("SELECT 1 FROM sessions WHERE id = ?", (ui_session_id,)) as cursor:
        if await cursor.fetchone() is None:
            raise HTTPException(404, f"Session not found: {ui_session_id}")
    await _add_message(ui_session_id, "user", message)

    async def tokens() -> AsyncIterator[str]:
        reply = []
        for token in _TOKEN.findall(message):
            await asyncio.sleep(DELAY)
            reply.append(token)
            yield token
        await _add_message(ui_session_id, "assistant", "".join(reply))

    return StreamingResponse(tokens(), media_type="text/plain; charset=utf-8")
