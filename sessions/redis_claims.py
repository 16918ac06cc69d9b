"""Claims on Redis: one interaction per session across processes, held with a lease that its owner renews."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from redis.asyncio import Redis

from parley.sessions.errors import ApiError, StoreUnavailable
from parley.sessions.interactions import CANCEL_REASONS, Interaction
from parley.sessions.redis import _reachable
from parley.sessions.redis_scripts import Scripts

logger = logging.getLogger("parley")

# How long a reply recorded "cancelled" says so, for a canceller waiting on a silent owner; how long a cancel's
# answer waits for a canceller that gave up on it.
_CANCELLED_TTL_MS = 60_000
_ANSWER_TTL = 30


class RedisClaims:
    """A claim is ``SET claim:<session> <process>:<interaction> NX PX <lease>``, renewed while the stream runs; if
    its process dies, the claim runs out and the session is free again. A renewal never re-creates a claim that
    is gone (run out during a Redis outage, or deleted with its session): the owner stops its reply instead, as
    it does when it cannot renew before its lease runs out, so two interactions of a session never overlap."""

    def __init__(self, redis: Redis, scripts: Scripts, prefix: str, process_id: str, lease_ms: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.prefix = prefix
        self.process_id = process_id
        self.lease_ms = lease_ms
        self.answer_at_release: dict[str, str] = {}  # interaction → the reply list of the cancel that stopped it

    def claim_key(self, session_id: str) -> str:
        return f"{self.prefix}claim:{session_id}"

    def cancel_left_key(self, interaction_id: str) -> str:
        return f"{self.prefix}cancel-left:{interaction_id}"

    def cancelled_key(self, interaction_id: str) -> str:
        return f"{self.prefix}cancelled:{interaction_id}"

    def value(self, interaction_id: str) -> str:
        return f"{self.process_id}:{interaction_id}"

    async def claim(self, interaction: Interaction) -> bool:
        with _reachable():
            value = self.value(interaction.id)
            return bool(await self.redis.set(self.claim_key(interaction.session_id), value, nx=True, px=self.lease_ms))

    async def renew(self, session_id: str, interaction_id: str) -> bool | str:
        """Extend the claim if it is still this interaction's; False if it is gone or another's. A cancel left
        for the interaction (see :meth:`sessions.redis_cancels.RedisCancelBus.cancel_elsewhere`) comes back as
        its reason."""
        keys = [self.claim_key(session_id), self.cancel_left_key(interaction_id)]
        with _reachable():
            answer: Any = await self.scripts.renew_claim(keys, [self.value(interaction_id), self.lease_ms])
        return answer if isinstance(answer, str) else bool(answer)

    @asynccontextmanager
    async def lease(self, interaction: Interaction) -> AsyncIterator[None]:
        async with anyio.create_task_group() as task_group:
            renewer = task_group.start_soon(self._keep_claimed, interaction)
            try:
                yield
            finally:
                renewer.cancel()

    async def _keep_claimed(self, interaction: Interaction) -> None:
        lease = self.lease_ms / 1000
        # Stop a little before the lease runs out, so that the reply is over before another process can claim.
        margin = lease / 10
        stop_at = time.monotonic() + lease - margin  # the claim was made just before
        while True:
            await anyio.sleep(max(0.0, min(lease / 3, stop_at - time.monotonic())))
            if time.monotonic() >= stop_at:
                break
            sent_at = time.monotonic()
            renewed: bool | str | None = None
            # Shielded, so that a renewal in flight is not torn out of its connection, but not past the lease.
            with anyio.CancelScope(shield=True, deadline=stop_at):
                try:
                    renewed = await self.renew(interaction.session_id, interaction.id)
                except StoreUnavailable:
                    logger.warning("could not renew the claim on session %s; retrying", interaction.session_id)
            if isinstance(renewed, str) and interaction.cancel(CANCEL_REASONS.get(renewed, "cancelled")):
                logger.info("session %s: a cancel left in Redis stopped its reply", interaction.session_id)
            if renewed:
                stop_at = sent_at + lease - margin
            elif renewed is False:
                break  # the claim is gone (its session deleted, or it ran out) or another's: stop at once
        if interaction.cancel("lease lost"):
            logger.warning("lost the claim on session %s: its reply is stopped", interaction.session_id)

    async def release(self, interaction: Interaction) -> None:
        keys = [self.claim_key(interaction.session_id), self.cancelled_key(interaction.id)]
        answer = self.answer_at_release.pop(interaction.id, None)
        if answer is not None:
            keys.append(answer)
        with anyio.CancelScope(shield=True):
            try:
                with _reachable():
                    arguments: list[str | int] = [self.value(interaction.id), interaction.status, _CANCELLED_TTL_MS]
                    arguments.append(_ANSWER_TTL)
                    await self.scripts.release_claim(keys, arguments)
            except ApiError:
                logger.warning("could not release session %s; its lease will run out", interaction.session_id)

    async def owner(self, session_id: str) -> tuple[str, str] | None:
        """The process and the interaction holding the session's claim, if any."""
        with _reachable():
            value: Any = await self.redis.get(self.claim_key(session_id))
        if value is None:
            return None
        process_id, _, interaction_id = str(value).partition(":")
        return process_id, interaction_id
