from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal, Protocol

import anyio
import anyio.abc

from sessions.errors import ApiError, SessionBusy
from sessions.store import new_id

logger = logging.getLogger("parley")

CancelReason = Literal["cancelled", "disconnected", "deleted"]
_REASONS: dict[str, CancelReason] = {"cancelled": "cancelled", "disconnected": "disconnected", "deleted": "deleted"}


class Interaction:
    """One message being answered: its id, and the one cancel scope that drives its stream."""

    def __init__(self, session_id: str) -> None:
        self.id = new_id("int_")
        self.session_id = session_id
        self.scope = anyio.CancelScope()
        self.reason: CancelReason | None = None
        self.finished = False
        self.ended = False
        self._ended_event: anyio.Event | None = None  # made only if someone waits: most interactions end unwatched

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the stream's scope. True only if this call stopped a stream that was still running."""
        if self.finished or self.reason is not None:
            return False
        self.reason = reason
        self.scope.cancel()
        return True

    def end(self) -> None:
        """The interaction is over and has recorded how."""
        self.ended = True
        if self._ended_event is not None:
            self._ended_event.set()

    async def wait_ended(self) -> None:
        if self.ended:
            return
        if self._ended_event is None:
            self._ended_event = anyio.Event()
        await self._ended_event.wait()


class Coordinator(Protocol):
    """What several processes share so that the rules hold across them (see :mod:`sessions.redis`)."""

    lease_ms: int

    async def claim(self, session_id: str, interaction_id: str) -> bool: ...
    async def renew(self, session_id: str, interaction_id: str) -> bool: ...
    async def release(self, session_id: str, interaction_id: str) -> None: ...
    async def owner(self, session_id: str) -> tuple[str, str] | None: ...
    async def request_cancel(self, process_id: str, session_id: str, interaction_id: str, reason: str) -> bool: ...
    async def listen(
        self, cancel: Callable[[str, str | None, str], bool], *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> None: ...

    @property
    def process_id(self) -> str: ...


class Interactions:
    """The interactions in progress, at most one per session, each driven inside its own cancel scope.

    Cancel, session delete and client disconnect all go through here to the interaction's scope. Alone,
    it is the in-process bus of the embedded setup; with a :class:`Coordinator` (Redis), the one-per-session
    rule and cancels reach across every process that shares it.
    """

    def __init__(self, coordinator: Coordinator | None = None) -> None:
        self._running: dict[str, Interaction] = {}
        self.coordinator = coordinator

    @asynccontextmanager
    async def open(self, session_id: str) -> AsyncIterator[Interaction]:
        """Claim the session for one interaction, for as long as the block runs. Raises SessionBusy."""
        if session_id in self._running:
            raise SessionBusy(session_id)
        interaction = Interaction(session_id)
        if self.coordinator is not None and not await self.coordinator.claim(session_id, interaction.id):
            raise SessionBusy(session_id)
        self._running[session_id] = interaction
        try:
            yield interaction
        finally:
            await self.release(interaction)

    async def release(self, interaction: Interaction) -> None:
        """End the interaction and free its session, in this process and (with a coordinator) in all of them.

        The stream calls it as soon as its reply is recorded, before the client sees the end: the client's
        next message, to this process or another, must find the session idle. :meth:`open` calls it in any
        case. Only the first call does anything."""
        if interaction.ended:
            return
        if self._running.get(interaction.session_id) is interaction:
            del self._running[interaction.session_id]
        interaction.end()
        if self.coordinator is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.coordinator.release(interaction.session_id, interaction.id)
                except ApiError:
                    logger.warning("could not release session %s; its lease will run out", interaction.session_id)

    async def keep_claimed(self, interaction: Interaction) -> None:
        """Renew the interaction's claim while it runs (a task in the interaction's task group)."""
        if self.coordinator is None:
            return
        while True:
            await anyio.sleep(self.coordinator.lease_ms / 3000)
            try:
                # Shielded: a renewal cancelled in flight could still reach Redis after the claim's release,
                # and renew the claim of an interaction that is over. Stopped, this task ends in its sleep.
                with anyio.CancelScope(shield=True):
                    await self.coordinator.renew(interaction.session_id, interaction.id)
            except ApiError:
                logger.warning("could not renew the claim on session %s; retrying", interaction.session_id)

    def get(self, session_id: str) -> Interaction | None:
        return self._running.get(session_id)

    def cancel_here(self, session_id: str, interaction_id: str | None = None, reason: str = "cancelled") -> bool:
        """Cancel the session's interaction if this process runs it (and it is ``interaction_id``, when given)."""
        interaction = self._running.get(session_id)
        if interaction is None or (interaction_id is not None and interaction.id != interaction_id):
            return False
        return interaction.cancel(_REASONS.get(reason, "cancelled"))

    async def cancel(
        self, session_id: str, interaction_id: str | None = None, reason: CancelReason = "cancelled"
    ) -> bool:
        """Cancel the session's running interaction, wherever it runs. True if one was stopped."""
        if session_id in self._running:
            # This process owns it: no need for Redis, so this works even while Redis is down.
            return self.cancel_here(session_id, interaction_id, reason)
        if self.coordinator is None:
            return False
        owner = await self.coordinator.owner(session_id)
        if owner is None or owner[0] == self.coordinator.process_id:
            return False
        process_id, running_id = owner
        if interaction_id is not None and interaction_id != running_id:
            return False
        return await self.coordinator.request_cancel(process_id, session_id, running_id, reason)

    async def is_streaming(self, session_id: str) -> bool:
        if session_id in self._running:
            return True
        return self.coordinator is not None and await self.coordinator.owner(session_id) is not None

    async def cancel_and_wait(self, session_id: str, reason: CancelReason, patience: float = 5.0) -> bool:
        """Cancel the session's interaction and wait (``patience`` seconds at most) until it has ended."""
        cancelled = await self.cancel(session_id, reason=reason)
        with anyio.move_on_after(patience):
            interaction = self._running.get(session_id)
            if interaction is not None:
                await interaction.wait_ended()
            # Run by another process, its end shows only in Redis: watch the claim go.
            while await self.is_streaming(session_id):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return cancelled

    async def wait_until_idle(self) -> None:
        """Wait until every interaction in this process has ended and recorded how."""
        while self._running:
            await next(iter(self._running.values())).wait_ended()

    def __len__(self) -> int:
        return len(self._running)
