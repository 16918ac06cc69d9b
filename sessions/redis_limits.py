"""The per-owner stream slots of :mod:`sessions.limits`, shared by every process on one Redis (or one Redis
Cluster): one sorted set per owner, ``parley:{owner:<owner>}:streams``.

On a single Redis, a chat takes its slot in the script that claims its session and gives it back in the one that
releases it (see :mod:`sessions.redis_claims`): no round trip of its own. On a cluster the owner's slots live in
the owner's hash slot, not the session's, so :meth:`RedisStreamSlots.take` and :meth:`give_back` are round trips of
their own there."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from parley.sessions.errors import ApiError
from parley.sessions.redis import _reachable as reachable  # (one rule for 'Redis is down' in every module)
from parley.sessions.redis import is_cluster
from parley.sessions.redis_keys import owner_streams
from parley.sessions.redis_scripts import Scripts
from parley.sessions.store import ignore_error

logger = logging.getLogger("parley")


class RedisStreamSlots:
    """The slots of every process that shares one Redis (see :mod:`sessions.limits`)."""

    def __init__(self, redis: Any, limit: int | None, prefix: str = "parley:", lease_seconds: float = 10.0) -> None:
        self.redis = redis
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self.limit = limit
        self.prefix = prefix
        self.lease_ms = max(int(lease_seconds * 1000), 100)
        self._held: dict[str, str] = {}  # this process's slots: interaction id -> owner
        self.scripts = Scripts(redis)
        # A script on a session's keys may take and give back the slot too (one Redis: any keys may meet).
        self.inline = not is_cluster(redis)

    def key(self, owner: str) -> str:
        return owner_streams(self.prefix, owner)

    def hold(self, owner: str, interaction_id: str) -> None:
        """A claim's script took the interaction's slot."""
        self._held[interaction_id] = owner

    def holds(self, interaction_id: str) -> bool:
        return interaction_id in self._held

    def forget(self, interaction_id: str) -> None:
        """A release's script gave the interaction's slot back."""
        self._held.pop(interaction_id, None)

    async def take(self, owner: str, interaction_id: str) -> bool:
        if self.limit is None:
            return True
        with reachable(self.on_error):
            taken = await self.scripts.take_slot([self.key(owner)], [interaction_id, self.limit, self.lease_ms])
        if taken:
            self._held[interaction_id] = owner
        return bool(taken)

    async def give_back(self, owner: str, interaction_id: str) -> None:
        if self._held.pop(interaction_id, None) is None:
            return
        try:
            with anyio.CancelScope(shield=True), reachable(self.on_error):
                await self.redis.zrem(self.key(owner), interaction_id)
        except ApiError:  # a slot not given back frees itself when its lease runs out
            logger.warning("could not give back a stream slot; its lease will run out")

    async def renew(self) -> None:
        """Renew the leases of this process's slots: one script per owner, in one round trip on a single Redis."""
        by_owner: dict[str, list[str]] = {}
        for interaction_id, owner in list(self._held.items()):
            by_owner.setdefault(owner, []).append(interaction_id)
        if not by_owner:
            return
        with reachable(self.on_error):
            if is_cluster(self.redis):
                for owner, interaction_ids in by_owner.items():
                    await self.scripts.renew_slots([self.key(owner)], [self.lease_ms, *interaction_ids])
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for owner, interaction_ids in by_owner.items():
                    await self.scripts.renew_slots([self.key(owner)], [self.lease_ms, *interaction_ids], client=pipe)
                await pipe.execute()

    async def keep_alive(self) -> None:
        """Renew this process's slots every third of a lease, until cancelled (a background task)."""
        if self.limit is None:
            return
        while True:
            await anyio.sleep(self.lease_ms / 3000)
            try:
                await self.renew()
            except ApiError:
                logger.warning("could not renew the stream slots; retrying")
