"""Scale-out on Redis: the store. (The coordinator that keeps one interaction per session across processes is in
:mod:`sessions.redis_coordinator`.)

redis-py's client runs on asyncio only: this module talks to asyncio (:func:`require_asyncio`), and parley on Redis
refuses another event loop (trio) at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from parley.sessions.errors import (
    EventLoopUnsupported,
    SessionExists,
    SessionGone,
    SessionNotFound,
    StoreUnavailable,
)
from parley.sessions.store import FileInfo, Message, MessageStatus, Session, ignore_error

logger = logging.getLogger("parley")

_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

# Mark a session's "streaming" turns "interrupted", unless an interaction holds the session's claim.
_INTERRUPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[1] .. 'msg:' .. id
  if redis.call('HGET', key, 'status') == 'streaming' then
    redis.call('HSET', key, 'status', 'interrupted')
    n = n + 1
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
return n
"""

_FINISH = """
local session_id = redis.call('HGET', KEYS[1], 'session_id')
if not session_id then return 0 end
redis.call('HSET', KEYS[1], 'content', ARGV[1], 'status', ARGV[2])
local streaming = ARGV[4] .. 'streaming:' .. session_id
redis.call('SREM', streaming, ARGV[3])
if redis.call('SCARD', streaming) == 0 then redis.call('SREM', ARGV[4] .. 'streaming', session_id) end
return 1
"""

_CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'agent', ARGV[1], 'created_at', ARGV[2], 'owner', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# Returns the ids of the files whose records it removed (nil when there was no such session for this owner).
# A session hash without 'owner' was stored before owners existed: it is the open owner's ('').
_DELETE_SESSION = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[3] then return false end
if redis.call('DEL', KEYS[1]) == 0 then return false end
local files = redis.call('LRANGE', KEYS[4], 0, -1)
redis.call('ZREM', KEYS[2], ARGV[2])
for _, id in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do redis.call('DEL', ARGV[1] .. 'msg:' .. id) end
for _, id in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do redis.call('DEL', ARGV[1] .. 'file:' .. id) end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[7])
redis.call('SREM', KEYS[6], ARGV[2])
return files
"""

# A file's record, only while its session exists.
_ADD_FILE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""

# The text so far of a reply still streaming (a finished one keeps its final text).
_CHECKPOINT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'streaming' then return 0 end
redis.call('HSET', KEYS[1], 'content', ARGV[1])
return 1
"""

_DELETE_FILE = """
if redis.call('HGET', KEYS[1], 'session_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[2], 0, ARGV[2])
return 1
"""


class _LostWhileWatching(Exception):
    pass


def connect(url: str, max_connections: int = 100, pool_timeout: float = 10.0) -> Redis:
    """A client whose requests queue for one of ``max_connections`` connections (up to ``pool_timeout``
    seconds) rather than fail: a busy process is not a Redis that is down."""
    # Short socket timeouts: when Redis is down, requests should hear 503 quickly rather than hang.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=15,
        # After Redis restarts, the pool's idle connections are dead sockets: a command that fails on one is
        # sent once more, at once, on a fresh connection (which fails fast, refused, if Redis is really down).
        retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
    )
    return Redis.from_pool(pool)


def require_asyncio() -> None:
    """Raise EventLoopUnsupported unless this runs on asyncio: redis-py's client knows no other event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise EventLoopUnsupported(
            "PARLEY_REDIS_URL: the Redis store runs on asyncio only (redis-py); serve parley on asyncio "
            "(uvicorn, or hypercorn's asyncio or uvloop worker class), not on trio"
        ) from None


@contextmanager
def _reachable(on_error: Callable[[str], None]) -> Iterator[None]:
    try:
        yield
    except _DOWN:
        on_error("redis")
        raise StoreUnavailable("The session store (Redis) is unavailable right now; try again shortly.") from None


class RedisStore:
    """The store on Redis. Behaves exactly like :class:`sessions.sqlite.SQLiteStore` (same tests)."""

    name = "redis"

    def __init__(self, redis: Redis, prefix: str = "parley:", finish_retry_seconds: float = 300.0) -> None:
        self.redis = redis
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self.prefix = prefix
        self.finish_retry_seconds = finish_retry_seconds

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _index(self, owner: str) -> str:
        """The sorted set of the owner's session ids, by creation time. The open owner's is the one that held
        every session before owners existed, so those sessions are listed as before."""
        return self.key("sessions") if owner == "" else self.key("owner", owner, "sessions")

    async def open(self) -> None:
        pass  # connections are made on first use, and again after Redis comes back

    async def close(self) -> None:
        await self.redis.aclose()

    async def create_session(self, session: Session) -> None:
        score = datetime.fromisoformat(session.created_at.replace("Z", "+00:00")).timestamp()
        with _reachable(self.on_error):
            created = await self.redis.eval(
                _CREATE_SESSION,
                2,
                self.key("session", session.ui_session_id),
                self._index(session.owner),
                session.agent,
                session.created_at,
                str(score),
                session.ui_session_id,
                session.owner,
            )
        if not created:
            raise SessionExists(session.ui_session_id)

    async def get_session(self, session_id: str, owner: str) -> Session | None:
        with _reachable(self.on_error):
            fields: Any = await self.redis.hgetall(self.key("session", session_id))
        return _session(session_id, fields, owner)

    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        with _reachable(self.on_error):
            ids: Any = await self.redis.zrevrange(self._index(owner), offset, offset + limit - 1)
            rows = await self._hashes("session", ids)
        found = (_session(sid, fields, owner) for sid, fields in zip(ids, rows, strict=True))
        return [session for session in found if session is not None]

    async def delete_session(self, session_id: str, owner: str) -> list[str] | None:
        with _reachable(self.on_error):
            file_ids: Any = await self.redis.eval(
                _DELETE_SESSION,
                7,
                self.key("session", session_id),
                self._index(owner),
                self.key("messages", session_id),
                self.key("files", session_id),
                self.key("streaming", session_id),
                self.key("streaming"),
                # Its claim goes too: an owner that did not answer the cancel (dead, or silent for a while) finds
                # its claim gone at its next renewal, and stops.
                self.key("claim", session_id),
                self.prefix,
                session_id,
                owner,
            )
        return None if file_ids is None else [str(file_id) for file_id in file_ids]

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], *, owner: str
    ) -> tuple[Session, list[Message]]:
        try:
            return await self._start_turn(user, assistant, history_limit, owner)
        except _LostWhileWatching:
            pass  # a dead pooled socket (Redis restarted): once more, on a fresh connection
        try:
            return await self._start_turn(user, assistant, history_limit, owner)
        except _LostWhileWatching:
            raise StoreUnavailable("The session store (Redis) is unavailable right now; try again shortly.") from None

    async def _start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], owner: str
    ) -> tuple[Session, list[Message]]:
        session_id = user.session_id
        session_key = self.key("session", session_id)
        with _reachable(self.on_error):
            # Read before the watch: a watching pipeline holds its connection until it writes, and must not wait
            # for a second one (with every pooled connection held that way, none would come).
            fields: Any = await self.redis.hgetall(session_key)
            session = _session(session_id, fields, owner)
            if session is None:
                raise SessionNotFound(session_id)
            limit = history_limit(session)
            history = await self._messages(session_id, -limit) if limit > 0 else []
            async with self.redis.pipeline(transaction=True) as pipe:
                # Optimistic: the turn is written only if the session still exists and is not deleted meanwhile.
                try:
                    await pipe.watch(session_key)
                    still: Any = await pipe.hgetall(session_key)
                except redis_errors.WatchError:
                    # (redis-py's report of a connection lost while a key is watched: nothing was written)
                    raise _LostWhileWatching from None
                if _session(session_id, still, owner) is None:  # deleted since (and its id perhaps taken again)
                    raise SessionGone(session_id)
                pipe.multi()  # type: ignore[no-untyped-call]  # (redis-py leaves it unannotated)
                for message in (user, assistant):
                    pipe.hset(self.key("msg", message.id), mapping=_message_fields(message))
                pipe.rpush(self.key("messages", session_id), user.id, assistant.id)
                pipe.sadd(self.key("streaming", session_id), assistant.id)
                pipe.sadd(self.key("streaming"), session_id)
                try:
                    await pipe.execute()
                except redis_errors.WatchError:
                    raise SessionGone(session_id) from None
        return session, history

    async def finish_turn(self, message_id: str, content: str, status: MessageStatus) -> None:
        # The last word of an interaction must not be lost to a Redis outage: keep trying until it is back.
        deadline = time.monotonic() + self.finish_retry_seconds
        delay = 0.05
        while True:
            try:
                await self.redis.eval(_FINISH, 1, self.key("msg", message_id), content, status, message_id, self.prefix)
                return
            except _DOWN:
                self.on_error(self.name)
                if time.monotonic() > deadline:
                    raise StoreUnavailable("The session store (Redis) stayed unavailable.") from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def checkpoint_turns(self, contents: Mapping[str, str]) -> None:
        with _reachable(self.on_error):
            async with self.redis.pipeline(transaction=False) as pipe:  # one round trip for them all
                for message_id, content in contents.items():
                    pipe.eval(_CHECKPOINT, 1, self.key("msg", message_id), content)
                await pipe.execute()

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        with _reachable(self.on_error):
            if session_id is None:
                members: Any = await self.redis.smembers(self.key("streaming"))
                session_ids = sorted(members)
            else:
                session_ids = [session_id]
            count = 0
            for sid in session_ids:
                count += await self.redis.eval(
                    _INTERRUPT,
                    3,
                    self.key("claim", sid),
                    self.key("streaming", sid),
                    self.key("streaming"),
                    self.prefix,
                    sid,
                )
        return count

    async def streaming_turn(self, session_id: str) -> str | None:
        with _reachable(self.on_error):
            message_id: Any = await self.redis.srandmember(self.key("streaming", session_id))
            if message_id is None:
                return None
            interaction_id: Any = await self.redis.hget(self.key("msg", message_id), "interaction_id")
        return str(interaction_id) if interaction_id is not None else None

    async def list_messages(self, session_id: str) -> list[Message]:
        return await self._messages(session_id, 0)

    async def _messages(self, session_id: str, start: int) -> list[Message]:
        with _reachable(self.on_error):
            ids: Any = await self.redis.lrange(self.key("messages", session_id), start, -1)
            rows = await self._hashes("msg", ids)
        return [_message(fields) for fields in rows if fields]

    async def add_file(self, info: FileInfo) -> None:
        fields = {
            "id": info.id,
            "session_id": info.session_id,
            "filename": info.filename,
            "mime_type": info.mime_type,
            "size": str(info.size),
            "sha256": info.sha256,
            "created_at": info.created_at,
        }
        # ARGV is the hash's fields and values, "id" first (the script appends ARGV[2], the id, to the list).
        pairs = [item for pair in fields.items() for item in pair]
        keys = self.key("session", info.session_id), self.key("file", info.id), self.key("files", info.session_id)
        with _reachable(self.on_error):
            added = await self.redis.eval(_ADD_FILE, 3, *keys, *pairs)
        if not added:
            raise SessionNotFound(info.session_id)

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None:
        with _reachable(self.on_error):
            fields: Any = await self.redis.hgetall(self.key("file", file_id))
        info = _file(fields) if fields else None
        return info if info is not None and info.session_id == session_id else None

    async def list_files(self, session_id: str) -> list[FileInfo]:
        with _reachable(self.on_error):
            ids: Any = await self.redis.lrange(self.key("files", session_id), 0, -1)
            rows = await self._hashes("file", ids)
        return [_file(fields) for fields in rows if fields]

    async def _hashes(self, kind: str, ids: list[str]) -> list[dict[str, str]]:
        """The hashes ``<kind>:<id>`` for these ids, in one round trip; a missing one is an empty dict."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for id_ in ids:
                pipe.hgetall(self.key(kind, id_))
            rows: list[dict[str, str]] = await pipe.execute()
        return rows

    async def delete_file(self, session_id: str, file_id: str) -> bool:
        with _reachable(self.on_error):
            deleted = await self.redis.eval(
                _DELETE_FILE, 2, self.key("file", file_id), self.key("files", session_id), session_id, file_id
            )
        return bool(deleted)


def _session(session_id: str, row: dict[str, str], owner: str) -> Session | None:
    """The session in ``row`` if it is ``owner``'s; None for no session (an empty row) or another owner's."""
    if not row or row.get("owner", "") != owner:
        return None
    return Session(session_id, row["agent"], row["created_at"], owner)


def _message_fields(message: Message) -> dict[Any, Any]:
    return {
        "id": message.id,
        "session_id": message.session_id,
        "role": message.role,
        "content": message.content,
        "file_ids": json.dumps(list(message.file_ids)),
        "status": message.status,
        "interaction_id": message.interaction_id,
        "created_at": message.created_at,
    }


def _message(row: dict[str, str]) -> Message:
    return Message(
        row["id"],
        row["session_id"],
        row["role"],  # type: ignore[arg-type]
        row["content"],
        tuple(json.loads(row["file_ids"])),
        row["status"],  # type: ignore[arg-type]
        row["interaction_id"],
        row["created_at"],
    )


def _file(row: dict[str, str]) -> FileInfo:
    fields = row["id"], row["session_id"], row["filename"], row["mime_type"], int(row["size"]), row["sha256"]
    return FileInfo(*fields, row["created_at"])
