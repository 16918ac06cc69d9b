"""Scale-out on Redis: the store, and the coordinator that keeps one interaction per session across
processes (a claim with a lease) and carries cancels to the process that owns the stream (pub/sub)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sessions.errors import ApiError, CancelFailed, SessionExists, SessionGone, SessionNotFound, StoreUnavailable
from sessions.interactions import CancelReason, Interaction, Interactions
from sessions.store import FileInfo, Message, MessageStatus, Session, Store

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
redis.call('HSET', KEYS[1], 'agent', ARGV[1], 'created_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# Returns the ids of the files whose records it removed (nil when there was no such session).
_DELETE_SESSION = """
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

# Only ever extends the claim: one that is gone is not made again (its owner stops instead).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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


@contextmanager
def _reachable() -> Iterator[None]:
    try:
        yield
    except _DOWN:
        raise StoreUnavailable("The session store (Redis) is unavailable right now; try again shortly.") from None


class RedisStore:
    """The store on Redis. Behaves exactly like :class:`sessions.sqlite.SQLiteStore` (same tests)."""

    def __init__(self, redis: Redis, prefix: str = "parley:", finish_retry_seconds: float = 300.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.finish_retry_seconds = finish_retry_seconds

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def open(self) -> None:
        pass  # connections are made on first use, and again after Redis comes back

    async def close(self) -> None:
        await self.redis.aclose()

    async def create_session(self, session: Session) -> None:
        score = datetime.fromisoformat(session.created_at.replace("Z", "+00:00")).timestamp()
        with _reachable():
            created = await self.redis.eval(
                _CREATE_SESSION,
                2,
                self.key("session", session.ui_session_id),
                self.key("sessions"),
                session.agent,
                session.created_at,
                str(score),
                session.ui_session_id,
            )
        if not created:
            raise SessionExists(session.ui_session_id)

    async def get_session(self, session_id: str) -> Session | None:
        with _reachable():
            fields: Any = await self.redis.hgetall(self.key("session", session_id))
        return _session(session_id, fields) if fields else None

    async def list_sessions(self, limit: int, offset: int) -> list[Session]:
        with _reachable():
            ids: Any = await self.redis.zrevrange(self.key("sessions"), offset, offset + limit - 1)
            rows = await self._hashes("session", ids)
        return [_session(sid, fields) for sid, fields in zip(ids, rows, strict=True) if fields]

    async def delete_session(self, session_id: str) -> list[str] | None:
        with _reachable():
            file_ids: Any = await self.redis.eval(
                _DELETE_SESSION,
                7,
                self.key("session", session_id),
                self.key("sessions"),
                self.key("messages", session_id),
                self.key("files", session_id),
                self.key("streaming", session_id),
                self.key("streaming"),
                # Its claim goes too: an owner that did not answer the cancel (dead, or silent for a while) finds
                # its claim gone at its next renewal, and stops.
                self.key("claim", session_id),
                self.prefix,
                session_id,
            )
        return None if file_ids is None else [str(file_id) for file_id in file_ids]

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int]
    ) -> tuple[Session, list[Message]]:
        try:
            return await self._start_turn(user, assistant, history_limit)
        except _LostWhileWatching:
            pass  # a dead pooled socket (Redis restarted): once more, on a fresh connection
        try:
            return await self._start_turn(user, assistant, history_limit)
        except _LostWhileWatching:
            raise StoreUnavailable("The session store (Redis) is unavailable right now; try again shortly.") from None

    async def _start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int]
    ) -> tuple[Session, list[Message]]:
        session_id = user.session_id
        session_key = self.key("session", session_id)
        with _reachable():
            # Read before the watch: a watching pipeline holds its connection until it writes, and must not wait
            # for a second one (with every pooled connection held that way, none would come).
            fields: Any = await self.redis.hgetall(session_key)
            if not fields:
                raise SessionNotFound(session_id)
            session = _session(session_id, fields)
            limit = history_limit(session)
            history = await self._messages(session_id, -limit) if limit > 0 else []
            async with self.redis.pipeline(transaction=True) as pipe:
                # Optimistic: the turn is written only if the session still exists and is not deleted meanwhile.
                try:
                    await pipe.watch(session_key)
                    exists = await pipe.exists(session_key)
                except redis_errors.WatchError:
                    # (redis-py's report of a connection lost while a key is watched: nothing was written)
                    raise _LostWhileWatching from None
                if not exists:
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
                if time.monotonic() > deadline:
                    raise StoreUnavailable("The session store (Redis) stayed unavailable.") from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def checkpoint_turn(self, message_id: str, content: str) -> None:
        with _reachable():
            await self.redis.eval(_CHECKPOINT, 1, self.key("msg", message_id), content)

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        with _reachable():
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
        with _reachable():
            message_id: Any = await self.redis.srandmember(self.key("streaming", session_id))
            if message_id is None:
                return None
            interaction_id: Any = await self.redis.hget(self.key("msg", message_id), "interaction_id")
        return str(interaction_id) if interaction_id is not None else None

    async def list_messages(self, session_id: str) -> list[Message]:
        return await self._messages(session_id, 0)

    async def _messages(self, session_id: str, start: int) -> list[Message]:
        with _reachable():
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
        with _reachable():
            added = await self.redis.eval(_ADD_FILE, 3, *keys, *pairs)
        if not added:
            raise SessionNotFound(info.session_id)

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None:
        with _reachable():
            fields: Any = await self.redis.hgetall(self.key("file", file_id))
        info = _file(fields) if fields else None
        return info if info is not None and info.session_id == session_id else None

    async def list_files(self, session_id: str) -> list[FileInfo]:
        with _reachable():
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
        with _reachable():
            deleted = await self.redis.eval(
                _DELETE_FILE, 2, self.key("file", file_id), self.key("files", session_id), session_id, file_id
            )
        return bool(deleted)


def _session(session_id: str, row: dict[str, str]) -> Session:
    return Session(session_id, row["agent"], row["created_at"])


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


CancelHandler = Callable[[str, "str | None", str], bool]


class RedisCoordinator:
    """One interaction per session across processes, and cancels that reach the process owning the stream.

    A claim is ``SET claim:<session> <process>:<interaction> NX PX <lease>``, renewed while the stream runs; if
    its process dies, the claim runs out and the session is free again. A renewal never re-creates a claim that
    is gone (run out during a Redis outage, or deleted with its session): the owner stops its reply instead, as
    it does when it cannot renew before its lease runs out, so two interactions of a session never overlap.
    A cancel for a stream owned elsewhere is published on the owner's channel; the owner cancels the scope and
    answers on a reply list whether it really had that interaction running.
    """

    def __init__(self, redis: Redis, prefix: str = "parley:", lease_seconds: float = 10.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = max(int(lease_seconds * 1000), 100)
        self.process_id = "proc_" + secrets.token_hex(8)
        self.listening = False

    def _claim_key(self, session_id: str) -> str:
        return f"{self.prefix}claim:{session_id}"

    def _channel(self, process_id: str) -> str:
        return f"{self.prefix}cancel:{process_id}"

    async def claim(self, interaction: Interaction) -> bool:
        with _reachable():
            value = f"{self.process_id}:{interaction.id}"
            return bool(await self.redis.set(self._claim_key(interaction.session_id), value, nx=True, px=self.lease_ms))

    async def renew(self, session_id: str, interaction_id: str) -> bool:
        """Extend the claim if it is still this interaction's; False if it is gone or another's."""
        value = f"{self.process_id}:{interaction_id}"
        with _reachable():
            return bool(await self.redis.eval(_RENEW, 1, self._claim_key(session_id), value, self.lease_ms))

    @asynccontextmanager
    async def lease(self, interaction: Interaction) -> AsyncIterator[None]:
        async with anyio.create_task_group() as task_group:
            renewer = task_group.start_soon(self._keep_claimed, interaction)
            try:
                yield
            finally:
                renewer.cancel()

    async def _keep_claimed(self, interaction: Interaction) -> None:
        lease = self.lease_ms / 1000
        # Stop a little before the lease runs out, so that the reply is over before another process can claim.
        margin = lease / 10
        stop_at = time.monotonic() + lease - margin  # the claim was made just before
        while True:
            await anyio.sleep(max(0.0, min(lease / 3, stop_at - time.monotonic())))
            if time.monotonic() >= stop_at:
                break
            sent_at = time.monotonic()
            renewed: bool | None = None
            # Shielded, so that a renewal in flight is not torn out of its connection, but not past the lease.
            with anyio.CancelScope(shield=True, deadline=stop_at):
                try:
                    renewed = await self.renew(interaction.session_id, interaction.id)
                except StoreUnavailable:
                    logger.warning("could not renew the claim on session %s; retrying", interaction.session_id)
            if renewed:
                stop_at = sent_at + lease - margin
            elif renewed is False:
                break  # the claim is gone (its session deleted, or it ran out) or another's: stop at once
        if interaction.cancel("lease lost"):
            logger.warning("lost the claim on session %s: its reply is stopped", interaction.session_id)

    async def release(self, interaction: Interaction) -> None:
        value = f"{self.process_id}:{interaction.id}"
        with _reachable():
            await self.redis.eval(_RELEASE, 1, self._claim_key(interaction.session_id), value)

    async def owner(self, session_id: str) -> tuple[str, str] | None:
        with _reachable():
            value: Any = await self.redis.get(self._claim_key(session_id))
        if value is None:
            return None
        process_id, _, interaction_id = str(value).partition(":")
        return process_id, interaction_id

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        owner = await self.owner(session_id)
        return owner is not None and interaction_id in (None, owner[1])

    async def cancel_elsewhere(self, session_id: str, interaction_id: str | None, reason: CancelReason) -> bool:
        owner = await self.owner(session_id)
        if owner is None or owner[0] == self.process_id:
            return False
        process_id, running_id = owner
        if interaction_id is not None and interaction_id != running_id:
            return False
        return await self.request_cancel(process_id, session_id, running_id, reason)

    async def request_cancel(self, process_id: str, session_id: str, interaction_id: str, reason: str) -> bool:
        """Ask the owning process to cancel; True if it stopped the stream. Raises CancelFailed if it is silent."""
        request_id = secrets.token_hex(8)
        reply_key = f"{self.prefix}cancel-reply:{request_id}"
        payload = json.dumps(
            {"request": request_id, "session": session_id, "interaction": interaction_id, "reason": reason}
        )
        with _reachable():
            receivers = await self.redis.publish(self._channel(process_id), payload)
            reply = await self.redis.blpop([reply_key], timeout=2) if receivers else None
        if reply is None:
            raise CancelFailed(
                f"Failed to cancel interaction for session: {session_id} (the process streaming it did not answer)"
            )
        return bool(reply[1] == "1")

    async def settle(self, store: Store, session_id: str | None = None) -> None:
        # Leases tell which owners are gone: their turns, and only theirs, are interrupted.
        await store.interrupt_turns(session_id)

    async def run(self, interactions: Interactions, store: Store) -> None:
        """The cancel listener, and a sweeper that interrupts the turns of processes that died."""
        async with anyio.create_task_group() as task_group:
            await task_group.start(self.listen, interactions.cancel_here)
            while True:
                await anyio.sleep(self.lease_ms / 1000)
                try:
                    await store.interrupt_turns()
                except ApiError:
                    logger.warning("lease sweeper: the store is unavailable; will retry")

    async def listen(
        self, cancel: CancelHandler, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve cancels addressed to this process until cancelled; rides out Redis outages."""
        started = False
        delay = 0.1
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel(self.process_id))
                    self.listening = True
                    delay = 0.1
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            await self._answer(message["data"], cancel)
            except _DOWN as exc:
                self.listening = False
                logger.warning("cancel listener lost Redis (%s); retrying", exc.__class__.__name__)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _answer(self, data: str, cancel: CancelHandler) -> None:
        try:
            request: dict[str, Any] = json.loads(data)
            cancelled = cancel(request["session"], request["interaction"] or None, request["reason"])
        except (ValueError, KeyError, TypeError):
            return
        reply_key = f"{self.prefix}cancel-reply:{request['request']}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(reply_key, "1" if cancelled else "0")
            pipe.expire(reply_key, 30)
            await pipe.execute()
