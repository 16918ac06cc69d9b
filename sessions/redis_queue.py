"""The line of messages that wait for a busy session on Redis (``if_busy=enqueue``, and ``interrupt`` at its front),
one line for every process: a hash under the session's hash tag, ``parley:{<session>}:queue``, interaction →
``<place> <until> <process> <owner>`` (see ``_LINE`` in :mod:`sessions.redis_scripts`).

- A message joins at the back (an interrupt at the front) and runs on the process that holds its request, once it
  is first and the claim is free: the claim's scripts refuse any other message while one waits, and take the
  message out of the line in the step that claims for it, so that nobody gets in between.
- A process keeps its waiting messages' places with a lease that it renews while they wait. One that dies loses its
  own messages: their entries run out within a lease and are dropped as the scripts meet them, and the others keep
  their order.
- Whoever moves the line tells the process whose message is now first, on that process's channel (the cancel bus):
  the release of the claim, and a message that leaves the line from its front. A waiting message also looks again
  at each renewal (a third of a lease), the slow way, for a word lost while its process was between subscriptions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from parley.sessions.errors import ApiError, StoreUnavailable, TooManyQueued
from parley.sessions.interactions import CancelReason, Interaction
from parley.sessions.redis import _reachable
from parley.sessions.redis_cancels import RedisCancelBus
from parley.sessions.redis_claims import RedisClaims
from parley.sessions.redis_keys import SessionKeys

logger = logging.getLogger("parley")


class RedisQueue:
    """The sessions' lines on Redis, and this process's messages in them."""

    def __init__(self, claims: RedisClaims, bus: RedisCancelBus) -> None:
        self.claims = claims
        self.bus = bus
        self.scripts = claims.scripts
        self.process_id = claims.process_id
        self._renew_at: dict[str, float] = {}  # this process's waiting interactions → when to renew their lease

    def key(self, session_id: str) -> str:
        return SessionKeys(self.claims.prefix, session_id).queue

    @property
    def _renew_every(self) -> float:
        return self.claims.lease_ms / 3000

    async def enqueue(self, interaction: Interaction, front: bool, limit: int | None) -> int:
        """Put the interaction in its session's line, at the back (or the front); its place. Raises TooManyQueued
        when ``limit`` messages wait already."""
        arguments: list[str | int] = [interaction.id, self.process_id, interaction.owner, self.claims.lease_ms]
        arguments += ("1" if front else "", limit or 0)
        with _reachable(self.claims.on_error):
            place: Any = await self.scripts.enqueue([self.key(interaction.session_id)], arguments)
        if place is None:
            raise TooManyQueued(limit or 0)
        self._renew_at[interaction.id] = time.monotonic() + self._renew_every
        return int(place)

    async def wait(self, interaction: Interaction, moved: anyio.Event) -> None:
        """Until ``moved`` is set (the line may have moved), or it is time to renew the interaction's place (then
        renewed; an interaction no longer in the line is cancelled, "lease lost")."""
        renew_at = self._renew_at.get(interaction.id, 0.0)
        with anyio.move_on_after(max(0.0, renew_at - time.monotonic())):
            await moved.wait()
            return
        self._renew_at[interaction.id] = time.monotonic() + self._renew_every
        try:
            with _reachable(self.claims.on_error):
                kept: Any = await self.scripts.renew_waiting(
                    [self.key(interaction.session_id)], [interaction.id, self.claims.lease_ms]
                )
        except StoreUnavailable:
            return  # (tried again at the next renewal: a stall shorter than the lease costs it nothing)
        if not kept:  # taken out of the line by a process whose word did not reach this one, or run out
            interaction.cancel("lease lost")

    async def dequeue(self, interaction: Interaction) -> None:
        """Take the interaction out of its session's line (it leaves without running); never raises, and finishes
        even when cancelled."""
        if self._renew_at.pop(interaction.id, None) is None:
            return
        session_id = interaction.session_id
        with anyio.CancelScope(shield=True):
            try:
                with _reachable(self.claims.on_error):
                    first: Any = await self.scripts.dequeue(
                        [self.key(session_id), SessionKeys(self.claims.prefix, session_id).claim], [interaction.id]
                    )
            except ApiError:
                logger.warning("could not take a message out of the line of session %s", session_id)
                return
            if first and first != self.process_id:  # (this process's own line moves after this: see Interactions)
                await self.tell_first(session_id, str(first))

    def entered(self, interaction: Interaction) -> None:
        """The interaction claimed its session: the claim's script took it out of the line."""
        self._renew_at.pop(interaction.id, None)

    async def line(self, session_id: str) -> list[str]:
        with _reachable(self.claims.on_error):
            ids: Any = await self.scripts.read_line([self.key(session_id)])
        return [str(interaction_id) for interaction_id in ids]

    async def drop(self, session_id: str, reason: CancelReason) -> None:
        """Empty the session's line, and tell the processes whose messages waited in it (never raises)."""
        with anyio.CancelScope(shield=True):
            try:
                with _reachable(self.claims.on_error):
                    processes: Any = await self.scripts.drop_line([self.key(session_id)])
                for process_id in processes:
                    if process_id != self.process_id:
                        await self.bus.publish(str(process_id), {"dequeue": session_id, "reason": reason})
            except ApiError:
                logger.warning("could not empty the line of session %s; its messages find out at renewal", session_id)

    async def tell_first(self, session_id: str, process_id: str | None) -> None:
        """Tell ``process_id`` that its message may now be first in the session's line (never raises)."""
        if process_id is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.bus.publish(process_id, {"moved": session_id})
            except ApiError:
                pass  # (it looks again at its next renewal)
