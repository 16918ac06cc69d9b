"""One connection to Redis on which every chat in flight pipelines its turn's scripts (the first and the last round
trip of a chat: :class:`sessions.redis_scripts.Scripts.run`).

redis-py spends ~60-90 µs of CPU on each command it sends (its connection pool, its retry and health-check
wrappers, its argument encoding in Python), as much as the rest of a short chat's turn: a chat's two scripts cost
parley's process more than the chat itself on SQLite. Here a command is packed by hiredis (C), written to one
shared connection (the writes of one event-loop iteration go out together), and its reply, read by hiredis, is
handed to whoever waits for it, in order: Redis answers a connection's commands in the order they came. A few µs
each, and one read and one write of Redis's for many chats rather than one each.

The rest (sessions, files, cancels, rejoins, queues) stays on redis-py. So do clients this does not speak for: a
Redis Cluster, TLS, a Unix socket, RESP3, credential providers, or no hiredis (:func:`pipe_of` answers None).

Failures read as redis-py's: ``ConnectionError``, ``TimeoutError`` (no reply within the socket timeout: the
connection is dropped, and every command waiting on it fails), ``ResponseError``. A caller cancelled while it waits
leaves its reply to be read and dropped: the connection stays in step. A connection lost is made again by the next
command; one idle longer than the health-check interval is checked with a PING first, as redis-py checks its own.

Like redis-py beside it, this talks to asyncio (a transport and futures on the running loop): parley on Redis runs
on asyncio only, and refuses trio at start-up (:func:`sessions.redis.require_asyncio`).
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript

try:
    import hiredis
except ImportError:  # (redis-py works without it; then so does parley, on redis-py alone)
    hiredis = None  # type: ignore[assignment]

# What a connection is checked with before use once it has been idle this long (redis-py's health_check_interval).
_IDLE_CHECK_SECONDS = 15.0

_pipes: weakref.WeakKeyDictionary[Any, Pipe | None] = weakref.WeakKeyDictionary()


def pipe_of(redis: Any) -> Pipe | None:
    """The pipe beside ``redis`` (one per client: its store and its coordinator share it), or None when the client
    is one that the pipe does not speak for (see the module's docstring)."""
    if redis in _pipes:
        return _pipes[redis]
    pipe = None
    pool = getattr(redis, "connection_pool", None)
    if hiredis is not None and isinstance(redis, Redis) and pool is not None and pool.connection_class is Connection:
        options = pool.connection_kwargs
        plain = all(not options.get(name) for name in ("credential_provider", "client_name", "lib_name"))
        if plain and options.get("protocol") in (None, 2, "2"):
            pipe = Pipe(
                options.get("host", "localhost"),
                int(options.get("port", 6379)),
                int(options.get("db", 0) or 0),
                options.get("username"),
                options.get("password"),
                options.get("socket_timeout") or 5.0,
                options.get("socket_connect_timeout") or 2.0,
            )
    _pipes[redis] = pipe
    return pipe


class Pipe:
    """``await pipe.script(script, keys, args)``: one script's reply, pipelined with every other caller's."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int,
        username: str | None,
        password: str | None,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.closed = False  # closed for good (its client is closed): callers go back to redis-py
        self._transport: asyncio.Transport | None = None
        self._reader: Any = None
        self._connecting: asyncio.Lock | None = None
        # The commands sent and not yet answered, oldest first: (the future of its reply, its deadline).
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._unsent: list[bytes] = []  # packed commands, written together once the loop's iteration is done
        self._timer: asyncio.TimerHandle | None = None
        self._last_reply = 0.0

    async def script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:  # (a Redis restarted, or SCRIPT FLUSH): EVAL loads it again
            return await self.call("EVAL", script.script, len(keys), *keys, *args)

    async def call(self, *command: Any) -> Any:
        if self._transport is None or time.monotonic() - self._last_reply > _IDLE_CHECK_SECONDS:
            await self._connect()
        return await self._send(_pack(command))

    def _send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((future, loop.time() + self.timeout))
        if not self._unsent:
            loop.call_soon(self._flush)
        self._unsent.append(packed)
        if self._timer is None:
            self._timer = loop.call_at(self._waiting[0][1], self._check_time)
        return future

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._transport is not None:
            self._transport.write(b"".join(unsent))

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._transport is not None:
                if time.monotonic() - self._last_reply <= _IDLE_CHECK_SECONDS:
                    return  # (another caller connected, or checked, meanwhile)
                try:
                    await self._send(_pack(("PING",)))
                    return
                except redis_errors.RedisError:
                    pass  # a dead idle connection: make a new one, once
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    transport, _ = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
            except TimeoutError:
                raise redis_errors.TimeoutError("Timeout connecting to Redis") from None
            self._reader = hiredis.Reader(encoding="utf-8", replyError=redis_errors.ResponseError)
            self._transport = transport
            self._last_reply = time.monotonic()
            greeting = []
            if self.password:
                credentials = (self.username, self.password) if self.username else (self.password,)
                greeting.append(self._send(_pack(("AUTH", *credentials))))
            if self.db:
                greeting.append(self._send(_pack(("SELECT", self.db))))
            try:
                for answer in greeting:
                    await answer
            except BaseException:
                self._drop(redis_errors.ConnectionError("Redis refused the connection's AUTH or SELECT."))
                raise

    def _received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # (not Redis on the other end)
                self._drop(redis_errors.ConnectionError(f"Redis sent what is not its protocol: {exc}"))
                return
            if reply is False:  # (the rest of a reply is still to come)
                break
            future = waiting.popleft()[0]
            if not future.done():  # (its caller gave up on it: the reply is dropped)
                if isinstance(reply, redis_errors.ResponseError):
                    future.set_exception(_error(str(reply)))
                else:
                    future.set_result(reply)
        self._last_reply = time.monotonic()

    def _check_time(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self._waiting[0][1]:
            self._drop(redis_errors.TimeoutError("Timeout reading from Redis"))
        else:
            self._timer = loop.call_at(self._waiting[0][1], self._check_time)

    def _drop(self, error: Exception) -> None:
        """The connection is gone (or given up on): every command waiting on it fails with ``error``."""
        transport, self._transport = self._transport, None
        self._unsent = []
        if transport is not None:
            transport.abort()
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _lost(self, transport: asyncio.BaseTransport, exc: Exception | None) -> None:
        if transport is self._transport:
            self._drop(redis_errors.ConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def close(self) -> None:
        """For good: later calls fail, and callers go back to redis-py (see ``closed``)."""
        self.closed = True
        self._drop(redis_errors.ConnectionError("The connection to Redis is closed."))


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.transport is self.pipe._transport:  # (not one given up on)
            self.pipe._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.pipe._lost(self.transport, exc)


def _pack(command: tuple[Any, ...]) -> bytes:
    return hiredis.pack_command(command)  # type: ignore[no-any-return]


def _error(message: str) -> Exception:
    # As redis-py reads it: LOADING (a Redis restarting, still reading its data) is a BusyLoadingError, which is a
    # ConnectionError (Redis not there yet: try again), NOSCRIPT a NoScriptError, and so on.
    return BaseParser.parse_error(message)  # type: ignore[no-untyped-call,no-any-return]
