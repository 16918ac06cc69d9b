"""Scale-out on Redis: the store. (The coordinator that keeps one interaction per session across processes is in
:mod:`sessions.redis_coordinator`; the keys are named in :mod:`sessions.redis_keys`, the scripts written in
:mod:`sessions.redis_scripts`.)

A session's keys share its hash tag, so a chat's writes are one script each on one slot, on a single Redis or a
Redis Cluster: :meth:`RedisStore.begin` (with the coordinator's claim, one round trip) and :meth:`RedisStore.end`
(with its release, one more). Messages are kept as JSON in one hash per session and their statuses in another, so
that a script never needs a key it was not given.

redis-py's client runs on asyncio only: this module talks to asyncio (:func:`require_asyncio`), and parley on Redis
refuses another event loop (trio) at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from parley.sessions.errors import (
    EditWithoutText,
    EventLoopUnsupported,
    MessageNotFound,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    StoreUnavailable,
    TooManyStreams,
)
from parley.sessions.parts import Part
from parley.sessions.redis_keys import SessionKeys, owner_sessions, session_id_of
from parley.sessions.redis_scripts import Scripts
from parley.sessions.store import (
    FileInfo,
    HistoryLimits,
    Message,
    MessageStatus,
    Session,
    derived_title,
    ignore_error,
)

logger = logging.getLogger("parley")

_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

# The start of the first user message, kept in the session's hash ('first') for its title while it has none set.
_FIRST_TEXT_CHARS = 1000

# A client of one Redis or of a Redis Cluster (PARLEY_REDIS_CLUSTER=1).
Client = Redis | RedisCluster


def connect(
    url: str,
    max_connections: int = 100,
    pool_timeout: float = 10.0,
    cluster: bool = False,
    socket_timeout: float = 5.0,
) -> Any:
    """A client whose requests queue for one of ``max_connections`` connections (up to ``pool_timeout``
    seconds) rather than fail: a busy process is not a Redis that is down. With ``cluster``, ``url`` names one
    node of a Redis Cluster, and the client finds the others (``max_connections`` per node). A reply that takes
    longer than ``socket_timeout`` seconds is Redis down."""
    # Short socket timeouts: when Redis is down, requests should hear 503 quickly rather than hang.
    if cluster:
        return RedisCluster.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=socket_timeout,
            max_connections=max_connections,
            health_check_interval=15,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=socket_timeout,
        health_check_interval=15,
        # After Redis restarts, the pool's idle connections are dead sockets: a command that fails on one is
        # sent once more, at once, on a fresh connection (which fails fast, refused, if Redis is really down).
        retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
    )
    return Redis.from_pool(pool)


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def require_asyncio() -> None:
    """Raise EventLoopUnsupported unless this runs on asyncio: redis-py's client knows no other event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise EventLoopUnsupported(
            "PARLEY_REDIS_URL: the Redis store runs on asyncio only (redis-py); serve parley on asyncio "
            "(uvicorn, or hypercorn's asyncio or uvloop worker class), not on trio"
        ) from None


_FINISH_RETRY_DELAY = 0.05


@contextmanager
def _reachable(on_error: Callable[[str], None]) -> Iterator[None]:
    try:
        yield
    except _DOWN:
        on_error("redis")
        raise StoreUnavailable("The session store (Redis) is unavailable right now; try again shortly.") from None


@dataclass(frozen=True)
class Claim:
    """What the coordinator adds to a turn's first script: its claim (``value`` for ``lease_ms``), and the owner's
    stream slot when a single Redis holds it with the session (``slots``, the key, and ``limit``)."""

    value: str
    lease_ms: int
    interaction_id: str
    slots: str | None = None
    limit: int = 0
    waiting: bool = False  # it waits in the session's line: claimed only while it is first there


@dataclass(frozen=True)
class Release:
    """What the coordinator adds to a turn's last script: freeing its claim (see ``_RELEASE`` in the scripts)."""

    value: str
    cancelled_key: str
    cancelled_ms: int
    answer: str | None
    answer_ttl: int
    interaction_id: str
    slots: str | None = None


class RedisStore:
    """The store on Redis. Behaves exactly like :class:`sessions.sqlite.SQLiteStore` (same tests)."""

    name = "redis"

    def __init__(self, redis: Any, prefix: str = "parley:", finish_retry_seconds: float = 300.0) -> None:
        self.redis: Any = redis
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self.prefix = prefix
        self.finish_retry_seconds = finish_retry_seconds
        self.scripts = Scripts(redis)
        # The replies this process is writing (id → the reply as started): their keys are their session's, and
        # finish_turn and checkpoint_turns are given their ids alone.
        self._replies: dict[str, Message] = {}
        self._limits_json: tuple[Mapping[str, int], str] | None = None

    def keys(self, session_id: str) -> SessionKeys:
        return SessionKeys(self.prefix, session_id)

    async def open(self) -> None:
        # Connections are made on first use, and again after Redis comes back. Data written before hash tags (a
        # single Redis, keys like parley:session:<id>) is not read: it is moved by a command.
        if not is_cluster(self.redis):
            try:
                info: Any = await self.redis.info("cluster")
            except _DOWN:
                info = {}
            except redis_errors.ResponseError:
                info = {}  # (a Redis that hides INFO: not a cluster node we can tell)
            if info.get("cluster_enabled") in (1, "1"):
                # Every key on another node would answer MOVED: refuse to open (each request hears it, 503).
                raise StoreUnavailable(
                    "PARLEY_REDIS_URL names a node of a Redis Cluster: set PARLEY_REDIS_CLUSTER=1 to use the cluster."
                )
        try:
            if not is_cluster(self.redis) and await self.redis.exists(self.prefix + "sessions"):
                logger.warning(
                    "Redis holds sessions in the layout before hash tags: run `python -m parley.sessions.redis_migrate`"
                )
        except _DOWN:
            pass

    async def close(self) -> None:
        self.scripts.close()
        await self.redis.aclose()

    async def create_session(self, session: Session) -> None:
        score = datetime.fromisoformat(session.created_at.replace("Z", "+00:00")).timestamp()
        index = owner_sessions(self.prefix, session.owner)
        session_id = session.ui_session_id
        with _reachable(self.on_error):
            # Listed first (the owner's list is in the owner's slot, the session in its own): a crash between
            # the two leaves a listed id with no session, which listing skips, never a session nobody lists.
            listed = await self.redis.zadd(index, {session_id: score}, nx=True)
            arguments = [session.agent, session.created_at, session.owner, session.title or ""]
            created = await self.scripts.create_session([self.keys(session_id).session], arguments)
            if not created and listed:
                await self.redis.zrem(index, session_id)
        if not created:
            raise SessionExists(session_id)

    async def get_session(self, session_id: str, owner: str) -> Session | None:
        with _reachable(self.on_error):
            fields: Any = await self.redis.hgetall(self.keys(session_id).session)
        return _session(session_id, fields, owner)

    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        with _reachable(self.on_error):
            ids: Any = await self.redis.zrevrange(owner_sessions(self.prefix, owner), offset, offset + limit - 1)
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hgetall(self.keys(session_id).session)
                rows: list[dict[str, str]] = await pipe.execute()
        found = (_session(sid, fields, owner) for sid, fields in zip(ids, rows, strict=True))
        return [session for session in found if session is not None]

    async def set_title(self, session_id: str, owner: str, title: str | None) -> bool:
        with _reachable(self.on_error):
            done = await self.scripts.set_title([self.keys(session_id).session], [owner, title or ""])
        return bool(done)

    async def delete_session(self, session_id: str, owner: str) -> list[str] | None:
        k = self.keys(session_id)
        keys = [k.session, k.message_ids, k.messages, k.statuses, k.streaming, k.file_ids, k.files, k.claim, k.leases]
        keys.append(k.queue)
        with _reachable(self.on_error):
            file_ids: Any = await self.scripts.delete_session(keys, [owner])
            if file_ids is not None:
                await self.redis.zrem(owner_sessions(self.prefix, owner), session_id)
        return None if file_ids is None else [str(file_id) for file_id in file_ids]

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], *, owner: str
    ) -> tuple[Session, list[Message]]:
        return await self.begin(user, assistant, history_limit, owner, None)

    async def begin(
        self,
        user: Message,
        assistant: Message,
        history_limit: Callable[[Session], int],
        owner: str,
        claim: Claim | None,
    ) -> tuple[Session, list[Message]]:
        """:meth:`start_turn`, and with ``claim``, the coordinator's claim (and stream slot) too, all in one round
        trip (with a :class:`HistoryLimits`; another callable costs a read of the session first). Raises
        SessionBusy or TooManyStreams for the claim, as well as what ``start_turn`` raises."""
        session_id = user.session_id
        k = self.keys(session_id)
        if isinstance(history_limit, HistoryLimits):
            limits = self._limits(history_limit.by_agent)
        else:
            session = await self.get_session(session_id, owner)
            limits = json.dumps({} if session is None else {session.agent: history_limit(session)})
        keys = [k.session, k.message_ids, k.messages, k.statuses, k.streaming, k.claim, k.leases, k.queue]
        arguments: list[str | int] = [owner, limits]
        for message in (user, assistant):
            arguments += (message.id, _message_json(message), message.status)
        if claim is None:
            arguments += ("", 0, "", 0)
        else:
            arguments += (claim.value, claim.lease_ms, claim.interaction_id, claim.limit)
            if claim.slots is not None:
                keys.append(claim.slots)
        arguments += (user.content[:_FIRST_TEXT_CHARS], "1" if claim is not None and claim.waiting else "")
        with _reachable(self.on_error):
            answer: Any = await self.scripts.run(self.scripts.begin_turn, keys, arguments)
        outcome = answer[0]
        if outcome == "missing":
            raise SessionNotFound(session_id)
        if outcome == "busy":
            raise SessionBusy(session_id)
        if outcome == "limit":
            raise TooManyStreams(claim.limit if claim is not None else 0)
        session = Session(session_id, answer[1], answer[2], owner)
        if outcome == "agent":
            history_limit(session)  # raises (AgentUnavailable)
            raise SessionNotFound(session_id)  # (an unknown agent that the limit did not refuse: not reached)
        self._replies[assistant.id] = assistant
        return session, _messages(answer[3], answer[4])

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
        k = self.keys(session_id)
        if isinstance(history_limit, HistoryLimits):
            limits = self._limits(history_limit.by_agent)
        else:
            session = await self.get_session(session_id, owner)
            limits = json.dumps({} if session is None else {session.agent: history_limit(session)})
        mode = "keep" if keep else "1" if user.content.strip() else "0"
        arguments: list[str | int] = [owner, target, "1" if missing_ok else "0", mode, limits]
        for message in (user, assistant):
            arguments += (message.id, _message_json(message), message.status)
        arguments.append(user.content[:_FIRST_TEXT_CHARS])
        keys = [k.session, k.message_ids, k.messages, k.statuses, k.streaming, k.leases]
        with _reachable(self.on_error):
            answer: Any = await self.scripts.replace_turn(keys, arguments)
        outcome = answer[0]
        if outcome == "missing":
            raise SessionNotFound(session_id)
        if outcome == "not_found":
            raise MessageNotFound(target)
        if outcome == "needs_text":
            raise EditWithoutText()
        session = Session(session_id, answer[1], answer[2], owner)
        if outcome == "agent":
            history_limit(session)  # raises (AgentUnavailable)
            raise SessionNotFound(session_id)
        asked = _messages([answer[3]], [answer[4]])[0] if answer[3] else user
        self._replies[assistant.id] = assistant
        return session, _messages(answer[5], answer[6]), asked

    def _limits(self, by_agent: Mapping[str, int]) -> str:
        cached = self._limits_json
        if cached is None or cached[0] is not by_agent:
            cached = self._limits_json = (by_agent, json.dumps(dict(by_agent)))
        return cached[1]

    async def finish_turn(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        await self.end(message_id, content, status, None, parts=parts, usage=usage)

    async def end(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        release: Release | None,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> str | None:
        """:meth:`finish_turn`, and with ``release``, the coordinator's release of the turn's claim (and stream
        slot) too, in one round trip. The last word of an interaction must not be lost to a Redis outage: this
        keeps trying until Redis is back (``finish_retry_seconds`` at most). With ``release``, answers the
        process of the message that waits first for the session, if one does (see sessions.redis_queue)."""
        reply = self._replies.get(message_id)
        if reply is None:
            return None  # not a reply this process started (it was recorded already)
        k = self.keys(reply.session_id)
        keys = [k.messages, k.statuses, k.streaming, k.leases, k.claim]
        arguments: list[str | int] = [message_id, _message_json(reply, content, parts, usage), status]
        if release is None:
            arguments += ("", 0, 0, "", "", "")
        else:
            keys += (release.cancelled_key, k.queue)
            if release.answer is not None:
                keys.append(release.answer)
            if release.slots is not None:
                keys.append(release.slots)
            arguments += (release.value, release.cancelled_ms, release.answer_ttl, release.interaction_id)
            arguments += ("1" if release.answer is not None else "", "1" if release.slots is not None else "")
        deadline = time.monotonic() + self.finish_retry_seconds
        while True:
            try:
                first: Any = await self.scripts.run(self.scripts.end_turn, keys, arguments)
                break
            except _DOWN:
                self.on_error(self.name)
                if time.monotonic() > deadline:
                    raise StoreUnavailable("The session store (Redis) stayed unavailable.") from None
                # Often (a failed attempt on a Redis that is down costs a refused connection): the reply must be
                # recorded by its owner within the lease of grace that other processes give it once Redis is back.
                await anyio.sleep(_FINISH_RETRY_DELAY)
        del self._replies[message_id]
        return str(first) if first else None

    async def checkpoint_turns(
        self,
        contents: Mapping[str, str],
        parts: Mapping[str, Sequence[Part]] | None = None,
        usages: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        parts, usages = parts or {}, usages or {}
        by_session: dict[str, list[str]] = {}
        for message_id, content in contents.items():
            reply = self._replies.get(message_id)
            if reply is not None:
                row = _message_json(reply, content, parts.get(message_id), usages.get(message_id))
                by_session.setdefault(reply.session_id, []).extend((message_id, row))
        if not by_session:
            return
        with _reachable(self.on_error):
            if is_cluster(self.redis):
                # One script per session, all at once (each runs on its session's node).
                async with anyio.create_task_group() as task_group:
                    for session_id, arguments in by_session.items():
                        task_group.start_soon(self._checkpoint, session_id, arguments)
                return
            async with self.redis.pipeline(transaction=False) as pipe:  # one round trip for them all
                for session_id, arguments in by_session.items():
                    k = self.keys(session_id)
                    await self.scripts.checkpoint_replies([k.messages, k.statuses], arguments, client=pipe)
                await pipe.execute()

    async def _checkpoint(self, session_id: str, arguments: Sequence[str]) -> None:
        k = self.keys(session_id)
        await self.scripts.checkpoint_replies([k.messages, k.statuses], arguments)

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        with _reachable(self.on_error):
            if session_id is not None:
                return await self._interrupt(session_id)
            # Every session with a turn streaming: found with SCAN (no key is shared by every chat to list them).
            count = 0
            async for key in self.redis.scan_iter(match=f"{self.prefix}{{*}}:streaming", count=1000):
                found = session_id_of(str(key), self.prefix)
                if found is not None:
                    count += await self._interrupt(found)
            return count

    async def _interrupt(self, session_id: str) -> int:
        k = self.keys(session_id)
        return int(await self.scripts.interrupt_orphans([k.claim, k.streaming, k.statuses, k.leases]))

    async def streaming_turn(self, session_id: str) -> str | None:
        k = self.keys(session_id)
        with _reachable(self.on_error):
            message_id: Any = await self.redis.srandmember(k.streaming)
            if message_id is None:
                return None
            row: Any = await self.redis.hget(k.messages, message_id)
        return None if row is None else str(json.loads(row)["interaction_id"])

    async def list_messages(self, session_id: str) -> list[Message]:
        k = self.keys(session_id)
        with _reachable(self.on_error):
            answer: Any = await self.scripts.read_messages([k.message_ids, k.messages, k.statuses], [0])
        return _messages(answer[0], answer[1])

    async def add_file(self, info: FileInfo) -> None:
        k = self.keys(info.session_id)
        record = json.dumps(info.to_json())
        with _reachable(self.on_error):
            added = await self.scripts.add_file([k.session, k.file_ids, k.files], [info.id, record])
        if not added:
            raise SessionNotFound(info.session_id)

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None:
        with _reachable(self.on_error):
            row: Any = await self.redis.hget(self.keys(session_id).files, file_id)
        return None if row is None else _file(session_id, row)

    async def list_files(self, session_id: str) -> list[FileInfo]:
        k = self.keys(session_id)
        with _reachable(self.on_error):
            rows: Any = await self.scripts.read_files([k.file_ids, k.files])
        return [_file(session_id, row) for row in rows if row]

    async def delete_file(self, session_id: str, file_id: str) -> bool:
        k = self.keys(session_id)
        with _reachable(self.on_error):
            deleted = await self.scripts.delete_file([k.file_ids, k.files], [file_id])
        return bool(deleted)


def _session(session_id: str, row: dict[str, str], owner: str) -> Session | None:
    """The session in ``row`` if it is ``owner``'s; None for no session (an empty row) or another owner's."""
    if not row or row.get("owner", "") != owner:
        return None
    return Session(
        session_id, row["agent"], row["created_at"], owner, row.get("title") or derived_title(row.get("first"))
    )


def _message_json(
    message: Message,
    content: str | None = None,
    parts: Sequence[Part] | None = None,
    usage: Mapping[str, int] | None = None,
) -> str:
    """A message as the store keeps it: JSON, without its status (kept beside it, so scripts change it alone).
    No "parts" nor "usage" key: a message of text alone with no usage (so is every one stored before they existed,
    which is how old data reads as it always did)."""
    row = json.dumps(
        {
            "id": message.id,
            "session_id": message.session_id,
            "role": message.role,
            "content": message.content if content is None else content,
            "file_ids": list(message.file_ids),
            "interaction_id": message.interaction_id,
            "created_at": message.created_at,
            "client_id": message.client_id,
        }
    )
    parts = message.parts if parts is None else parts
    usage = message.usage if usage is None else usage
    # Parts and usage are written compact: a tool's input or output may hold a "client_id" key of its own, which
    # must not look like the message's to REPLACE_TURN (it looks for '"client_id": "', as json.dumps spaces it).
    if parts is not None:
        row = row[:-1] + ', "parts": ' + json.dumps(list(parts), default=str, separators=(",", ":")) + "}"
    if usage is not None:
        row = row[:-1] + ', "usage": ' + json.dumps(dict(usage), separators=(",", ":")) + "}"
    return row


def _messages(rows: Sequence[str | None], statuses: Sequence[str | None]) -> list[Message]:
    messages = []
    for row, status in zip(rows, statuses, strict=True):
        if row:
            fields = json.loads(row)
            messages.append(
                Message(
                    fields["id"],
                    fields["session_id"],
                    fields["role"],
                    fields["content"],
                    tuple(fields["file_ids"]),
                    status or "complete",  # type: ignore[arg-type]
                    fields["interaction_id"],
                    fields["created_at"],
                    fields.get("client_id", ""),
                    fields.get("parts"),
                    fields.get("usage"),
                )
            )
    return messages


def _file(session_id: str, row: str) -> FileInfo:
    fields = json.loads(row)
    return FileInfo(
        fields["id"],
        session_id,
        fields["filename"],
        fields["mime_type"],
        int(fields["size"]),
        fields["sha256"],
        fields["created_at"],
    )
