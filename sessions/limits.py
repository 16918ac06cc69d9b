"""How many replies one owner may have running at once (``PARLEY_MAX_STREAMS_PER_OWNER``).

A turn takes a slot for its owner before anything is recorded and gives it back when it ends. In one
process the slots are a counter per owner (:class:`LocalStreamSlots`). Across workers they live in Redis
(:class:`sessions.redis_limits.RedisStreamSlots`): one sorted set per owner, of the interaction ids
holding a slot, each scored with the time its lease runs out. Every process renews the leases of its own
slots in one round trip (a background task, every third of a lease), so a worker that dies stops renewing,
and its slots free themselves once their leases run out; taking a slot first drops the expired ones. The
clock is Redis's own (``TIME`` in the scripts), so hosts whose clocks disagree agree on when a lease ends.
"""

from __future__ import annotations

from typing import Protocol


class StreamSlots(Protocol):
    limit: int | None

    async def take(self, owner: str, interaction_id: str) -> bool:
        """Take a slot for the owner's new reply; False when the owner already has ``limit`` running."""

    async def give_back(self, owner: str, interaction_id: str) -> None:
        """Free the slot (a no-op if it holds none); never raises, and finishes even when cancelled."""

    async def keep_alive(self) -> None:
        """Whatever keeps this process's slots alive while their replies run (a background task)."""


class LocalStreamSlots:
    """The slots of one process: a count per owner. With ``limit=None``, every call is a no-op."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._running: dict[str, set[str]] = {}

    async def take(self, owner: str, interaction_id: str) -> bool:
        if self.limit is None:
            return True
        running = self._running.setdefault(owner, set())
        if len(running) >= self.limit:
            return False
        running.add(interaction_id)
        return True

    async def give_back(self, owner: str, interaction_id: str) -> None:
        running = self._running.get(owner)
        if running is not None:
            running.discard(interaction_id)
            if not running:
                del self._running[owner]

    async def keep_alive(self) -> None:
        """Nothing to renew in one process."""
