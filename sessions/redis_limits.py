"""The per-owner stream slots of :mod:`sessions.limits`, shared by every process on one Redis."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from parley.sessions.errors import ApiError
from parley.sessions.redis import _reachable as reachable  # (one rule for 'Redis is down' in every module)
from parley.sessions.store import ignore_error

logger = logging.getLogger("parley")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the owner's slots; ARGV: interaction id, limit, lease (ms).
_TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: the owners' slots, ARGV[1] the lease (ms), then each key's interaction id; a slot already gone
# (its lease ran out while Redis was unreachable) is not taken again: XX.
_RENEW = (
    _NOW
    + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""
)


class RedisStreamSlots:
    """The slots of every process that shares one Redis (see :mod:`sessions.limits`)."""

    def __init__(self, redis: Redis, limit: int | None, prefix: str = "parley:", lease_seconds: float = 10.0) -> None:
        self.redis = redis
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self.limit = limit
        self.prefix = prefix
        self.lease_ms = max(int(lease_seconds * 1000), 100)
        self._held: dict[str, str] = {}  # this process's slots: interaction id -> owner

    def _key(self, owner: str) -> str:
        return f"{self.prefix}streams:{owner}"

    async def take(self, owner: str, interaction_id: str) -> bool:
        if self.limit is None:
            return True
        with reachable(self.on_error):
            taken = await self.redis.eval(_TAKE, 1, self._key(owner), interaction_id, self.limit, self.lease_ms)
        if taken:
            self._held[interaction_id] = owner
        return bool(taken)

    async def give_back(self, owner: str, interaction_id: str) -> None:
        if self._held.pop(interaction_id, None) is None:
            return
        try:
            with anyio.CancelScope(shield=True), reachable(self.on_error):
                await self.redis.zrem(self._key(owner), interaction_id)
        except ApiError:  # a slot not given back frees itself when its lease runs out
            logger.warning("could not give back a stream slot; its lease will run out")

    async def renew(self) -> None:
        """Renew the leases of this process's slots, all in one round trip."""
        held = list(self._held.items())
        if not held:
            return
        keys = [self._key(owner) for _, owner in held]
        args: list[Any] = [self.lease_ms, *(interaction_id for interaction_id, _ in held)]
        with reachable(self.on_error):
            await self.redis.eval(_RENEW, len(keys), *keys, *args)

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
