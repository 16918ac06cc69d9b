"""Claims on Redis: one interaction per session across processes, held with a lease that its owner renews."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from parley.sessions.errors import ApiError, SessionBusy, StoreUnavailable, TooManyStreams
from parley.sessions.interactions import CANCEL_REASONS, Interaction
from parley.sessions.redis import Claim, Release, _reachable
from parley.sessions.redis_keys import SessionKeys
from parley.sessions.redis_limits import RedisStreamSlots
from parley.sessions.redis_scripts import Scripts
from parley.sessions.store import ignore_error

logger = logging.getLogger("parley")

# How long a reply recorded "cancelled" says so, for a canceller waiting on a silent owner; how long a cancel's
# answer waits for a canceller that gave up on it.
_CANCELLED_TTL_MS = 60_000
_ANSWER_TTL = 30


class RedisClaims:
    """A claim is ``parley:{<session>}:claim`` = ``<process>:<interaction>:<owner>``, set only if absent, with a
    lease that the owner renews while the stream runs; if its process dies, the claim runs out and the session is
    free again. A renewal never re-creates a claim that is gone (run out during a Redis outage, or deleted with its
    session): the owner stops its reply instead, as it does when it cannot renew before its lease runs out, so two
    interactions of a session never overlap.

    The claim is taken in a chat's first round trip and freed in its last: with the Redis store, inside the
    store's own scripts (see :class:`sessions.redis.Claim` and :class:`sessions.redis.Release`); with another
    store, by scripts of its own (one round trip each). A short chat's lease is never renewed (the first renewal
    is due a third of a lease in)."""

    def __init__(self, redis: Any, scripts: Scripts, prefix: str, process_id: str, lease_ms: int) -> None:
        self.redis = redis
        self.on_error: Callable[[str], None] = ignore_error  # (RedisCoordinator.on_error)
        self.scripts = scripts
        self.prefix = prefix
        self.process_id = process_id
        self.lease_ms = lease_ms
        self.answer_at_release: dict[str, str] = {}  # interaction → the reply list of the cancel that stopped it
        self._held: set[str] = set()  # the interactions whose claims this process holds
        # While keep_leases runs: its task group, and the leases it watches (interaction id → _Lease).
        self._renewers: anyio.abc.TaskGroup | None = None
        self._leases: dict[str, _Lease] = {}

    def keys(self, session_id: str) -> SessionKeys:
        return SessionKeys(self.prefix, session_id)

    def value(self, interaction: Interaction) -> str:
        # (The owner last: it may hold a colon. It tells a claim of another owner's, an intruder's that its
        # store call is about to refuse, from one of the session's own: see RedisCoordinator.)
        return f"{self.process_id}:{interaction.id}:{interaction.owner}"

    def to_take(self, interaction: Interaction, slots: RedisStreamSlots | None) -> Claim:
        """The claim for a store's script to take (with the owner's stream slot, when ``slots`` is given)."""
        value, waiting = self.value(interaction), interaction.shared_place
        if slots is None:
            return Claim(value, self.lease_ms, interaction.id, waiting=waiting)
        return Claim(value, self.lease_ms, interaction.id, slots.key(interaction.owner), slots.limit or 0, waiting)

    def taken(self, interaction: Interaction, slots: RedisStreamSlots | None) -> None:
        """A store's script took the claim (and the slot, with ``slots``)."""
        self._held.add(interaction.id)
        if slots is not None:
            slots.hold(interaction.owner, interaction.id)

    async def claim(self, interaction: Interaction, slots: RedisStreamSlots | None) -> None:
        """Claim the session (and with ``slots``, take the owner's stream slot first): one round trip. Raises
        TooManyStreams, SessionBusy."""
        claim = self.to_take(interaction, slots)
        session_keys = self.keys(interaction.session_id)
        keys = [session_keys.claim, session_keys.queue]
        if claim.slots is not None:
            keys.append(claim.slots)
        arguments: list[str | int] = [claim.value, claim.lease_ms, claim.interaction_id, claim.limit]
        arguments.append("1" if claim.waiting else "")
        with _reachable(self.on_error):
            answer: Any = await self.scripts.run(self.scripts.claim_session, keys, arguments)
        if answer == "limit":
            raise TooManyStreams(claim.limit)
        if answer == "busy":
            raise SessionBusy(interaction.session_id)
        self.taken(interaction, slots)

    def to_release(self, interaction: Interaction, slots: RedisStreamSlots | None) -> Release | None:
        """The release for a store's script to do with the record, if this process holds the claim (then it no
        longer counts it as held: see :meth:`release`)."""
        if interaction.id not in self._held:
            return None
        self._held.discard(interaction.id)
        keys = self.keys(interaction.session_id)
        answer = self.answer_at_release.pop(interaction.id, None)
        slot_key = None
        if slots is not None and slots.inline and slots.holds(interaction.id):
            slot_key = slots.key(interaction.owner)
            slots.forget(interaction.id)
        return Release(
            self.value(interaction),
            keys.cancelled(interaction.id),
            _CANCELLED_TTL_MS,
            answer,
            _ANSWER_TTL,
            interaction.id,
            slot_key,
        )

    def keep(self, interaction: Interaction, release: Release | None, slots: RedisStreamSlots | None) -> None:
        """Undo :meth:`to_release`: the script that was to release did not (or may not have) run."""
        if release is None:
            return
        self._held.add(interaction.id)
        if release.answer is not None:
            self.answer_at_release[interaction.id] = release.answer
        if release.slots is not None and slots is not None:
            slots.hold(interaction.owner, interaction.id)

    async def release(self, interaction: Interaction, slots: RedisStreamSlots | None) -> str | None:
        """Free the claim if this process still holds it; never raises, and finishes even when cancelled. Answers
        the process of the message that waits first for the session, if one does (see sessions.redis_queue)."""
        release = self.to_release(interaction, slots)
        if release is None:
            return None
        session_keys = self.keys(interaction.session_id)
        keys = [session_keys.claim, release.cancelled_key, session_keys.queue]
        keys += [key for key in (release.answer, release.slots) if key is not None]
        arguments: list[str | int] = [release.value, interaction.status, release.cancelled_ms, release.answer_ttl]
        arguments += (release.interaction_id, "1" if release.answer else "", "1" if release.slots else "")
        with anyio.CancelScope(shield=True):
            try:
                with _reachable(self.on_error):
                    first: Any = await self.scripts.run(self.scripts.release_claim, keys, arguments)
            except ApiError:
                logger.warning("could not release session %s; its lease will run out", interaction.session_id)
                return None
        return str(first) if first else None

    async def renew(self, interaction: Interaction) -> bool | str:
        """Extend the claim if it is still this interaction's (and the lease of its reply in history, once it has
        one); False if it is gone or another's. A cancel left for the interaction (see
        :meth:`sessions.redis_cancels.RedisCancelBus.cancel_elsewhere`) comes back as its reason."""
        keys = self.keys(interaction.session_id)
        with _reachable(self.on_error):
            answer: Any = await self.scripts.renew_claim(
                [keys.claim, keys.cancel_left(interaction.id), keys.leases],
                [self.value(interaction), self.lease_ms, interaction.message_id],
            )
        return answer if isinstance(answer, str) else bool(answer)

    @asynccontextmanager
    async def lease(self, interaction: Interaction) -> AsyncIterator[None]:
        if self._renewers is not None and not interaction.agent_done:
            # keep_leases gives the reply a renewer if it outlives a sixth of a lease: a short chat has none. (A
            # reply still to be recorded once its agent is done renews at once: it starts its own, below.)
            lease = self._leases[interaction.id] = _Lease(interaction, time.monotonic())
            try:
                yield
            finally:
                del self._leases[interaction.id]
                if lease.scope is not None:
                    lease.scope.cancel()
            return
        async with anyio.create_task_group() as task_group:
            renewer = task_group.start_soon(self._keep_claimed, interaction, time.monotonic())
            try:
                yield
            finally:
                renewer.cancel()

    async def keep_leases(self) -> None:
        """Until cancelled (the coordinator runs it): start a renewer, in this task group, for each reply in progress
        that has run a sixth of a lease, well before its first renewal is due (a third in). Starting a task with
        every chat, and cancelling it at its end, cost a short chat a sixth of its instructions (make
        bench-instructions). Without it (an app whose lifespan does not run), each lease starts its own."""
        async with anyio.create_task_group() as task_group:
            self._renewers = task_group
            try:
                while True:
                    await anyio.sleep(self.lease_ms / 6000)
                    for lease in self._leases.values():
                        if lease.scope is None:
                            lease.scope = anyio.CancelScope()
                            task_group.start_soon(self._renew_until_cancelled, lease)
            finally:
                self._renewers = None

    async def _renew_until_cancelled(self, lease: _Lease) -> None:
        assert lease.scope is not None
        with lease.scope:
            await self._keep_claimed(lease.interaction, lease.claimed_at)

    async def _keep_claimed(self, interaction: Interaction, claimed_at: float) -> None:
        lease = self.lease_ms / 1000
        # Stop a little before the lease runs out, so that the reply is over before another process can claim.
        margin = lease / 10
        stop_at = claimed_at + lease - margin  # the claim was made just before
        # Each attempt gets a timeout that fits the lease (a socket timeout may be longer than the whole lease), and
        # a renewal that failed is tried again soon: a stall of Redis shorter than the lease does not stop the reply.
        attempt = max(lease / 10, 0.05)
        # A lease taken once the agent is done keeps the claim while the reply is recorded (the store was slow or
        # down, see TurnRunner): the claim was last renewed up to a third of a lease ago, so renew it at once.
        due = claimed_at + (0 if interaction.agent_done else lease / 3)
        while True:
            await anyio.sleep(max(0.0, min(due, stop_at) - time.monotonic()))
            if time.monotonic() >= stop_at:
                break
            sent_at = time.monotonic()
            renewed: bool | str | None = None
            # Shielded, so that the reply's cancel does not tear a renewal out of its connection, but not past the
            # attempt's timeout nor the lease.
            with anyio.CancelScope(shield=True, deadline=min(stop_at, sent_at + attempt)):
                try:
                    renewed = await self.renew(interaction)
                except StoreUnavailable:
                    pass
            if renewed is None:
                logger.warning("could not renew the claim on session %s; retrying", interaction.session_id)
                due = time.monotonic() + attempt / 2
                continue
            if isinstance(renewed, str) and interaction.cancel(CANCEL_REASONS.get(renewed, "cancelled")):
                logger.info("session %s: a cancel left in Redis stopped its reply", interaction.session_id)
            if renewed:
                stop_at = sent_at + lease - margin
                due = sent_at + lease / 3
            else:
                break  # the claim is gone (its session deleted, or it ran out) or another's: stop at once
        if interaction.cancel("lease lost"):
            logger.warning("lost the claim on session %s: its reply is stopped", interaction.session_id)

    async def owner(self, session_id: str) -> tuple[str, str] | None:
        """The process and the interaction holding the session's claim, if any."""
        holder = await self.holder(session_id)
        return None if holder is None else holder[:2]

    async def holder(self, session_id: str) -> tuple[str, str, str] | None:
        """The process, the interaction and the owner holding the session's claim, if any."""
        with _reachable(self.on_error):
            value: Any = await self.redis.get(self.keys(session_id).claim)
        return None if value is None else parse(value)


def parse(value: str) -> tuple[str, str, str]:
    """A claim's process, interaction and owner."""
    process_id, _, rest = str(value).partition(":")
    interaction_id, _, owner = rest.partition(":")
    return process_id, interaction_id, owner


class _Lease:
    """A reply's claim, as :meth:`RedisClaims.keep_leases` watches it: when it was taken, and once its renewer has
    started, the cancel scope that stops it when the reply ends."""

    __slots__ = ("claimed_at", "interaction", "scope")

    def __init__(self, interaction: Interaction, claimed_at: float) -> None:
        self.interaction = interaction
        self.claimed_at = claimed_at
        self.scope: anyio.CancelScope | None = None
