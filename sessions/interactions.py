from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio

from sessions.errors import SessionBusy
from sessions.store import new_id

CancelReason = Literal["cancelled", "disconnected", "deleted"]


class Interaction:
    """One message being answered: its id, and the one cancel scope that drives its stream."""

    def __init__(self, session_id: str) -> None:
        self.id = new_id("int_")
        self.session_id = session_id
        self.scope = anyio.CancelScope()
        self.reason: CancelReason | None = None
        self.finished = False
        self.done = anyio.Event()

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the stream's scope. True only if this call stopped a stream that was still running."""
        if self.finished or self.reason is not None:
            return False
        self.reason = reason
        self.scope.cancel()
        return True


class Interactions:
    """The interactions in progress in this process, at most one per session.

    Cancel, session delete and client disconnect all go through here to the interaction's scope.
    """

    def __init__(self) -> None:
        self._running: dict[str, Interaction] = {}

    @asynccontextmanager
    async def open(self, session_id: str) -> AsyncIterator[Interaction]:
        """Claim the session for one interaction, for as long as the block runs. Raises SessionBusy."""
        if session_id in self._running:
            raise SessionBusy(session_id)
        interaction = Interaction(session_id)
        self._running[session_id] = interaction
        try:
            yield interaction
        finally:
            del self._running[session_id]
            interaction.done.set()

    def get(self, session_id: str) -> Interaction | None:
        return self._running.get(session_id)

    def cancel(self, session_id: str, interaction_id: str | None = None, reason: CancelReason = "cancelled") -> bool:
        """Cancel the session's running interaction (only if it is ``interaction_id``, when given)."""
        interaction = self._running.get(session_id)
        if interaction is None or (interaction_id is not None and interaction.id != interaction_id):
            return False
        return interaction.cancel(reason)

    async def cancel_and_wait(self, session_id: str, reason: CancelReason, patience: float = 5.0) -> bool:
        """Cancel the session's interaction and wait (``patience`` seconds at most) until it has recorded its end."""
        interaction = self._running.get(session_id)
        if interaction is None:
            return False
        cancelled = interaction.cancel(reason)
        with anyio.move_on_after(patience):
            await interaction.done.wait()
        return cancelled

    def __len__(self) -> int:
        return len(self._running)
