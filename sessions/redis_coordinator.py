"""Scale-out on Redis: the coordinator, a thin front over three parts, each in a module of its own.

- :mod:`sessions.redis_claims`: one interaction per session across processes (a claim with a lease);
- :mod:`sessions.redis_cancels`: the cancel bus, which carries cancels to the process that owns the stream;
- :mod:`sessions.redis_rejoin`: rejoining a reply from any process (its owner mirrors it into a Redis stream on
  demand).

Their Lua scripts are in :mod:`sessions.redis_scripts`.
"""

from __future__ import annotations

import logging
import secrets

import anyio
import anyio.abc
from redis.asyncio import Redis

from parley.sessions.errors import ApiError
from parley.sessions.interactions import CancelReason, Followed, Interaction, Interactions, Lease, OwnerCheck
from parley.sessions.redis_cancels import RedisCancelBus
from parley.sessions.redis_claims import RedisClaims
from parley.sessions.redis_rejoin import RedisRejoin
from parley.sessions.redis_scripts import Scripts
from parley.sessions.store import Store

logger = logging.getLogger("parley")


class RedisCoordinator:
    """One interaction per session across processes (:class:`RedisClaims`), cancels that reach the process owning
    the stream (:class:`RedisCancelBus`), and rejoins from any process (:class:`RedisRejoin`)."""

    def __init__(self, redis: Redis, prefix: str = "parley:", lease_seconds: float = 10.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.process_id = "proc_" + secrets.token_hex(8)
        scripts = Scripts(redis)
        self.claims = RedisClaims(redis, scripts, prefix, self.process_id, max(int(lease_seconds * 1000), 100))
        self.bus = RedisCancelBus(redis, scripts, prefix, self.claims)
        self.rejoin = RedisRejoin(redis, prefix, self.claims, self.bus)

    async def claim(self, interaction: Interaction) -> bool:
        return await self.claims.claim(interaction)

    def lease(self, interaction: Interaction) -> Lease:
        return self.claims.lease(interaction)

    async def release(self, interaction: Interaction) -> None:
        await self.claims.release(interaction)

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        return await self.rejoin.streaming_elsewhere(session_id, interaction_id)

    async def cancel_elsewhere(
        self,
        session_id: str,
        interaction_id: str | None,
        reason: CancelReason,
        owner: str | None,
        wait_out_silence: bool = False,
        check: OwnerCheck | None = None,
    ) -> bool:
        return await self.bus.cancel_elsewhere(session_id, interaction_id, reason, owner, wait_out_silence, check)

    async def follow(self, session_id: str) -> Followed | None:
        return await self.rejoin.follow(session_id)

    async def interrupt_orphans(self, store: Store, session_id: str | None = None) -> None:
        # Leases tell which owners are gone: their turns, and only theirs, are interrupted.
        await store.interrupt_turns(session_id)

    async def run(self, interactions: Interactions, store: Store) -> None:
        """The cancel listener, and a sweeper that interrupts the turns of processes that died."""
        async with anyio.create_task_group() as task_group:
            await task_group.start(self.listen, interactions, task_group)
            while True:
                await anyio.sleep(self.claims.lease_ms / 1000)
                try:
                    await store.interrupt_turns()
                except ApiError:
                    logger.warning("lease sweeper: the store is unavailable; will retry")

    async def listen(
        self,
        interactions: Interactions,
        task_group: anyio.abc.TaskGroup,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve cancels and follow requests addressed to this process until cancelled (mirrors for rejoins run
        in ``task_group``)."""
        await self.bus.listen(interactions, task_group, self.rejoin.on_follow, task_status=task_status)
