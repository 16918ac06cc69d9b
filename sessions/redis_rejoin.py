"""Rejoining from another process on Redis. The owner mirrors an interaction into a Redis stream only when someone
asks (a "follow" message on its channel): the whole reply from its first token, then each token as it comes, then
its end; the stream expires a while after the end. So the hot path pays nothing while nobody rejoins, and a
follower anywhere reads the stream with XREAD BLOCK, from the start, without missing what came before it asked
(pub/sub alone would lose what was published before the follower subscribed)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc

from parley.sessions.errors import RejoinFailed, StoreUnavailable
from parley.sessions.interactions import Followed, Interaction, Interactions
from parley.sessions.parts import decode, encode
from parley.sessions.redis import _DOWN, _reachable
from parley.sessions.redis_cancels import RedisCancelBus
from parley.sessions.redis_claims import RedisClaims
from parley.sessions.redis_keys import SessionKeys

logger = logging.getLogger("parley")

# How long a rejoin waits for the owner to start its mirror; how long a mirror outlives its interaction.
_FOLLOW_PATIENCE = 3.0
_FRAMES_TTL = 60


class RedisRejoin:
    """Mirrors of this process's replies for followers elsewhere, and followers of other processes' replies."""

    def __init__(self, redis: Any, prefix: str, claims: RedisClaims, bus: RedisCancelBus) -> None:
        self.redis = redis
        self.prefix = prefix
        self.claims = claims
        self.bus = bus
        self._mirrored: set[str] = set()  # interactions being mirrored into Redis for rejoins

    def frames_key(self, interaction: Interaction) -> str:
        return SessionKeys(self.prefix, interaction.session_id).frames(interaction.id)

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        owner = await self.claims.owner(session_id)
        return owner is not None and interaction_id in (None, owner[1])

    async def follow(self, session_id: str) -> Followed | None:
        owner = await self.claims.owner(session_id)
        if owner is None:
            return None
        process_id, interaction_id = owner
        if not await self.bus.publish(process_id, {"follow": interaction_id, "session": session_id}):
            return None  # its process is gone: its turn is recorded interrupted once its lease runs out
        mirror = Interaction(session_id)
        mirror.id = interaction_id
        reader = _MirrorReader(self, mirror)
        with anyio.move_on_after(_FOLLOW_PATIENCE):
            while not mirror.message_id and not mirror.status:
                await reader.read()
        if not mirror.message_id:
            if mirror.status or not await self.streaming_elsewhere(session_id, interaction_id):
                return None  # it ended meanwhile (or before its reply started)
            raise RejoinFailed(f"Failed to rejoin the reply of session: {session_id} (its process did not answer)")
        return mirror, reader.run

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


class _MirrorReader:
    """Fills a mirror of an interaction from the stream its owner writes, until its end. If the owner dies
    mid-reply (its claim goes, and no end comes), the mirror ends ``interrupted``."""

    def __init__(self, rejoin: RedisRejoin, mirror: Interaction) -> None:
        self.rejoin = rejoin
        self.mirror = mirror
        self.key = rejoin.frames_key(mirror)
        self.last = "0-0"
        self.idle = 0
        # Where the owner's copy is in the reply: after a blip, the owner writes its copy again from the first
        # token into the same stream (a new "m" entry); the tokens this mirror already holds are not added twice.
        self.at = 0

    async def read(self) -> None:
        mirror = self.mirror
        with _reachable(self.rejoin.claims.on_error):
            answer: Any = await self.rejoin.redis.xread({self.key: self.last}, count=1000, block=1000)
        if not answer:
            self.idle += 1
            if self.idle >= 2 and not await self.rejoin.streaming_elsewhere(mirror.session_id, mirror.id):
                mirror.finish("interrupted")
            return
        self.idle = 0
        for entry_id, fields in answer[0][1]:
            self.last = entry_id
            if "t" in fields or "x" in fields:  # a text token, or another event (see _mirror)
                if self.at >= len(mirror.tokens):
                    mirror.add(fields["t"] if "t" in fields else decode(fields["x"]))
                self.at += 1
            elif "m" in fields:
                mirror.message_id = fields["m"]
                self.at = 0
            elif "s" in fields:
                mirror.error = fields["e"] or None
                mirror.finish(fields["s"])

    async def run(self) -> None:
        while not self.mirror.status:
            try:
                await self.read()
            except StoreUnavailable:
                self.mirror.finish("interrupted")
