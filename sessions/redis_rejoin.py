"""Rejoining from another process on Redis. The owner mirrors an interaction into a Redis stream only when someone
asks (a "follow" message on its channel): the whole reply from its first token, then each token as it comes, then
its end; the stream expires a while after the end. So the hot path pays nothing while nobody rejoins, and a
follower anywhere reads the stream from the start, without missing what came before it asked (pub/sub alone would
lose what was published before the follower subscribed).

A process reads each reply it follows once, however many of its clients follow it: one copy of the reply per
process (:class:`_Copy`), which every local follower reads from memory. One task reads every followed stream, with
one ``XREAD`` on a connection of its own, apart from the pool that serves requests: followers, however many, never
hold a connection that a request needs. The task runs in the coordinator's task group from the first follower on,
and ends with the last.

A follower is told how a reply ended only when its owner said so in the stream. If the copy cannot know (Redis
failed under the reader, or the owner's claim went with no end written), the follower ends without a ``finish``:
the client rejoins, and finds the reply's record in history.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.abc
from redis.exceptions import RedisError

from parley.sessions.errors import RejoinFailed, StoreUnavailable
from parley.sessions.interactions import Followed, Interaction, Interactions
from parley.sessions.parts import decode, encode
from parley.sessions.redis import _DOWN, _reachable, is_cluster
from parley.sessions.redis_cancels import RedisCancelBus
from parley.sessions.redis_claims import RedisClaims
from parley.sessions.redis_keys import SessionKeys

logger = logging.getLogger("parley")

# How long a rejoin waits for the owner to start its mirror; how long a mirror outlives its interaction.
_FOLLOW_PATIENCE = 3.0
_FRAMES_TTL = 60
# How long one XREAD of the reader waits for news (a reply followed meanwhile interrupts it: see follow); how
# long a followed stream may stay silent before the reader asks whether its owner still holds the claim.
_READ_BLOCK_MS = 1000
_SILENCE_SECONDS = 2.0
# On a Redis Cluster, replies followed in several slots are read without blocking, this often.
_CLUSTER_POLL_SECONDS = 0.05


class RedisRejoin:
    """Mirrors of this process's replies for followers elsewhere, and the copies of other processes' replies that
    this process's followers read."""

    def __init__(
        self, redis: Any, prefix: str, claims: RedisClaims, bus: RedisCancelBus, reader: Any | None = None
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.claims = claims
        self.bus = bus
        # The reader's own client (one connection), apart from the request pool; the request client in tests.
        self.reader = reader if reader is not None else redis
        self._mirrored: set[str] = set()  # interactions being mirrored into Redis for rejoins
        self._copies: dict[str, _Copy] = {}  # interaction id → the copy this process's followers read
        self._reading = False
        self._waiting: anyio.CancelScope | None = None  # the reader's XREAD in flight
        # The coordinator's task group (see RedisCoordinator.listen), which the reader runs in.
        self.task_group: anyio.abc.TaskGroup | None = None

    def frames_key(self, interaction: Interaction) -> str:
        return SessionKeys(self.prefix, interaction.session_id).frames(interaction.id)

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None, owner: str | None = None) -> bool:
        holder = await self.claims.holder(session_id)
        return holder is not None and interaction_id in (None, holder[1]) and owner in (None, holder[2])

    async def follow(self, session_id: str) -> Followed | None:
        owner = await self.claims.owner(session_id)
        if owner is None:
            return None
        process_id, interaction_id = owner
        copy = self._copies.get(interaction_id)
        if copy is None:
            if self.task_group is None:
                raise RejoinFailed(f"Failed to rejoin the reply of session: {session_id} (no reader runs here)")
            if not await self.bus.publish(process_id, {"follow": interaction_id, "session": session_id}):
                return None  # its process is gone: its turn is recorded interrupted once its lease runs out
            copy = self._copies.get(interaction_id)  # (another follower may have made it meanwhile)
            if copy is None:
                copy = self._copies[interaction_id] = _Copy(self, session_id, interaction_id)
                if not self._reading:
                    self._reading = True
                    self.task_group.start_soon(self._read)
                elif self._waiting is not None:
                    # Read it now, not after the XREAD in flight: that one is given up (its connection closed, as
                    # redis-py does with a command it does not see to its end), and the next one names it too.
                    self._waiting.cancel()
        mirror = copy.mirror
        copy.followers += 1  # (given back when its follower ends: see _Copy.follow)
        try:
            with anyio.move_on_after(_FOLLOW_PATIENCE):
                while not mirror.message_id and not mirror.status and not copy.lost:
                    await mirror.changed()
            # Not started: it ended meanwhile (or before its reply started), or its process did not answer. (Lost:
            # if Redis failed under the reader, this asks it again, and a 503 says so.)
            ended = not mirror.message_id and (
                bool(mirror.status) or not await self.streaming_elsewhere(session_id, interaction_id)
            )
            if not mirror.message_id and not ended:
                raise RejoinFailed(f"Failed to rejoin the reply of session: {session_id} (its process did not answer)")
        except BaseException:
            copy.leave()
            raise
        if ended:
            copy.leave()
            return None
        return mirror, copy.follow

    def on_follow(self, request: dict[str, Any], interactions: Interactions, task_group: anyio.abc.TaskGroup) -> None:
        """A follower elsewhere asks for a reply of this process's: mirror it (once)."""
        interaction = interactions.get(request["session"])
        # (Also before its reply has started, between its claim and its first write: _mirror waits for the start.)
        if interaction is not None and interaction.id == request["follow"]:
            if interaction.id not in self._mirrored:
                self._mirrored.add(interaction.id)
                task_group.start_soon(self._mirror, interaction)

    async def _mirror(self, interaction: Interaction) -> None:
        key = self.frames_key(interaction)
        sent, first = 0, True
        try:
            # Claimed, not started yet: its message id is set in a moment (nothing wakes a waiter for it: look).
            while not interaction.message_id and not interaction.status:
                with anyio.move_on_after(0.02):
                    await interaction.changed()
            if not interaction.message_id:  # it ended before its reply started: nothing to rejoin
                await self.redis.xadd(key, {"s": interaction.status, "e": interaction.error or ""})
                await self.redis.expire(key, _FRAMES_TTL)
                return
            while True:
                tokens, status = interaction.tokens[sent:], interaction.status
                if not (first or tokens or status):
                    # Nothing new since the last write (checked with no await since): wait for the next change.
                    await interaction.changed()
                    continue
                async with self.redis.pipeline(transaction=False) as pipe:
                    if first:
                        pipe.xadd(key, {"m": interaction.message_id})
                    for token in tokens:
                        # Text as it is; any other event as parts.encode's JSON (parts.decode reads it back).
                        pipe.xadd(key, {"t": token} if type(token) is str else {"x": encode(token)})
                    if status:
                        pipe.xadd(key, {"s": status, "e": interaction.error or ""})
                    pipe.expire(key, _FRAMES_TTL)
                    await pipe.execute()
                sent, first = sent + len(tokens), False
                if status:
                    return
        except _DOWN:
            logger.warning("lost Redis while mirroring interaction %s for a rejoin", interaction.id)
        finally:
            self._mirrored.discard(interaction.id)

    async def _read(self) -> None:
        """Read every followed stream until nobody here follows any (the task the first follower starts)."""
        try:
            while self._copies:
                copies = {copy.key: copy for copy in self._copies.values()}
                try:
                    with _reachable(self.claims.on_error):
                        found = None
                        try:
                            with anyio.CancelScope() as self._waiting:
                                found = await self._next(copies)
                        finally:
                            self._waiting = None
                        for key, entries in found or ():
                            copy = copies[key]
                            copy.add(entries)
                            if copy.mirror.status:
                                self._drop(copy)
                        now = time.monotonic()
                        for copy in copies.values():
                            # A silent stream whose owner no longer holds the claim: it died, or lost its lease.
                            if now - copy.heard >= _SILENCE_SECONDS and self._copies.get(copy.interaction_id) is copy:
                                copy.heard = now
                                if not await self.streaming_elsewhere(copy.mirror.session_id, copy.interaction_id):
                                    self._lose(copy)
                except (StoreUnavailable, RedisError) as exc:
                    logger.warning("lost Redis while reading replies for rejoins (%s); their followers end", exc)
                    for copy in list(self._copies.values()):
                        self._lose(copy)
        finally:
            self._reading = False

    async def _next(self, copies: dict[str, _Copy]) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        """What came in the followed streams since each was last read (an XREAD that waits a moment for news)."""
        streams = {key: copy.last for key, copy in copies.items()}
        if not is_cluster(self.reader):
            return list(await self.reader.xread(streams, count=1000, block=_READ_BLOCK_MS) or ())
        # A Redis Cluster reads the keys of one slot at a time (each session's keys share one).
        slots: dict[int, dict[str, str]] = {}
        for key, last in streams.items():
            slots.setdefault(self.reader.keyslot(key), {})[key] = last
        block = _READ_BLOCK_MS if len(slots) == 1 else None
        found: list[tuple[str, list[tuple[str, dict[str, str]]]]] = []
        for group in slots.values():
            found += await self.reader.xread(group, count=1000, block=block) or ()
        if not found and block is None:
            await anyio.sleep(_CLUSTER_POLL_SECONDS)
        return found

    def _drop(self, copy: _Copy) -> None:
        """Stop reading a copy (ended, lost, or followed by nobody here any more)."""
        if self._copies.get(copy.interaction_id) is copy:
            del self._copies[copy.interaction_id]

    def _lose(self, copy: _Copy) -> None:
        copy.lost = True
        copy.mirror.notify()
        self._drop(copy)


class _Copy:
    """This process's copy of a reply that another process runs, filled by the reader from its owner's stream, and
    read by every local follower of it. ``lost``: it stopped before the reply's end, which it cannot tell."""

    def __init__(self, rejoin: RedisRejoin, session_id: str, interaction_id: str) -> None:
        self.rejoin = rejoin
        self.interaction_id = interaction_id
        self.mirror = Interaction(session_id)
        self.mirror.id = interaction_id
        self.key = rejoin.frames_key(self.mirror)
        self.last = "0-0"
        self.heard = time.monotonic()
        self.followers = 0
        self.lost = False
        # Where the owner's copy is in the reply: after a blip, the owner writes its copy again from the first
        # token into the same stream (a new "m" entry); the tokens this copy already holds are not added twice.
        self.at = 0

    def add(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        mirror = self.mirror
        self.heard = time.monotonic()
        for entry_id, fields in entries:
            self.last = entry_id
            if "t" in fields or "x" in fields:  # a text token, or another event (see RedisRejoin._mirror)
                if self.at >= len(mirror.tokens):
                    mirror.add(fields["t"] if "t" in fields else decode(fields["x"]))
                self.at += 1
            elif "m" in fields:
                mirror.message_id = fields["m"]
                self.at = 0
                mirror.notify()
            elif "s" in fields:
                mirror.error = fields["e"] or None
                mirror.finish(fields["s"])
                return

    async def follow(self) -> None:
        """A follower's part: until the reply ends here (or the copy is lost); the last follower to leave stops the
        reading of it."""
        try:
            while not self.mirror.status and not self.lost:
                await self.mirror.changed()
        finally:
            self.leave()

    def leave(self) -> None:
        self.followers -= 1
        if self.followers <= 0:
            self.rejoin._drop(self)
