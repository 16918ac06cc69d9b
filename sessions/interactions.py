"""The interactions in progress: one per session, each with the one cancel scope that drives its reply, and the
coordinator that carries the one-per-session rule and cancels across processes (local, or Redis)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import anyio

from parley.sessions.errors import (
    CancelFailed,
    Dequeued,
    RejoinFailed,
    SessionBusy,
    SessionNotFound,
    TooManyQueued,
    TooManyStreams,
)
from parley.sessions.limits import LocalStreamSlots, StreamSlots
from parley.sessions.store import Store, new_id

logger = logging.getLogger("parley")

CancelReason = Literal["cancelled", "disconnected", "deleted", "lease lost"]
# What a message into a session that has a reply in progress does: is refused (409), stops that reply and runs,
# or waits its turn (first come, first served).
IfBusy = Literal["reject", "interrupt", "enqueue"]
IF_BUSY: tuple[IfBusy, ...] = ("reject", "interrupt", "enqueue")
# What a cancel did, as the web layer counts it; a failure to reach the owner raises CancelFailed instead.
CancelOutcome = Literal["cancelled_here", "cancelled_elsewhere", "not_running"]
CANCEL_REASONS: dict[str, CancelReason] = {
    "cancelled": "cancelled",
    "disconnected": "disconnected",
    "deleted": "deleted",
}


class Interaction:
    """One message being answered: its id, the one cancel scope that drives its reply, and the text so far.

    ``done`` turns true the moment the agent has said its last word (or failed): from then on a cancel no
    longer counts, so a cancel says it stopped the reply exactly when the reply is recorded as stopped.
    ``over`` turns true once the reply is recorded and the session freed.
    """

    def __init__(self, session_id: str, owner: str = "") -> None:
        self.id = new_id("int_")
        self.session_id = session_id
        self.owner = owner  # whom the request acts for (auth.py); only that owner's cancels reach it
        self.scope = anyio.CancelScope()
        self.reason: CancelReason | None = None
        self.done = False
        self.over = False
        self.message_id = ""  # the assistant's message in history, once the turn has started
        # While it waits for its session (if_busy enqueue or interrupt): a cancel takes it out of the line.
        self.waiting: anyio.CancelScope | None = None
        self.tokens: list[str] = []  # the reply so far: rejoining clients read it from here
        self.status = ""  # the history status, once done
        self.error: str | None = None  # what a failure after the first token said, for renderers that can tell
        # Events made only when someone waits: most interactions are neither followed nor watched.
        self.waiter: anyio.Event | None = None  # set when a follower waits for the next change
        self._over_event: anyio.Event | None = None

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the reply's scope. True only if this call stopped a reply that was still running."""
        if self.done or self.reason is not None:
            return False
        self.reason = reason
        if self.waiting is not None:
            self.waiting.cancel()  # (it never started: it leaves the line, and nothing of it is recorded)
        self.scope.cancel()
        return True

    def notify(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    def add(self, token: str) -> None:
        self.tokens.append(token)
        self.notify()

    def finish(self, status: str) -> None:
        self.status = status
        self.notify()

    async def changed(self) -> None:
        """Wait for the next token, or for the reply's end (``status`` set). Only what happens after the call
        wakes it: look at ``tokens`` and ``status`` just before, with no ``await`` in between."""
        if self.waiter is None:
            self.waiter = anyio.Event()
        await self.waiter.wait()

    def end(self) -> None:
        """The interaction is over: recorded, and its session freed."""
        self.over = True
        if self._over_event is not None:
            self._over_event.set()

    async def wait_over(self) -> None:
        if self.over:
            return
        if self._over_event is None:
            self._over_event = anyio.Event()
        await self._over_event.wait()


# The web layer's check that the session is the canceller's owner's (it raises NotFound if not): run only when
# nothing else has shown it, before a cancel answers "not running" or leaves anything on the session's behalf.
OwnerCheck = Callable[[], Awaitable[object]]

# A copy of an interaction that another process runs, and the task that fills it as that one goes on.
Followed = tuple[Interaction, Callable[[], Coroutine[Any, Any, None]]]

# Holds a claim while a reply runs (``async with``): for the Redis coordinator, a renewer task.
Lease = AbstractAsyncContextManager[None]


class Coordinator(Protocol):
    """What the processes serving one store share so that the rules hold across them. One is chosen at
    start-up: :class:`LocalCoordinator` (one process, embedded store) or :class:`sessions.redis.RedisCoordinator`.
    """

    async def claim(self, interaction: Interaction) -> bool:
        """Claim the interaction's session across processes; False if another process holds it."""

    def lease(self, interaction: Interaction) -> Lease:
        """Keep the claim while the reply runs; if the claim is lost, cancel the interaction ("lease lost")."""

    async def release(self, interaction: Interaction) -> None:
        """Free the claim. Never raises, and finishes even when cancelled (it shields what it must)."""

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        """Does another process run the session's interaction (``interaction_id``, if given)?"""

    async def cancel_elsewhere(
        self,
        session_id: str,
        interaction_id: str | None,
        reason: CancelReason,
        owner: str | None,
        wait_out_silence: bool = False,
        check: OwnerCheck | None = None,
    ) -> bool:
        """Cancel the session's interaction in the process that runs it, if it runs for ``owner`` (any owner:
        None); True if it was stopped there. Raises CancelFailed when that process cannot be reached (or,
        locally, when there might be one); with ``wait_out_silence``, a silent process is waited out first
        (a lease at most): see :meth:`sessions.redis_coordinator.RedisCoordinator.cancel_elsewhere`. Runs
        ``check`` before it answers False, raises CancelFailed or leaves anything for the canceller: only a
        True, which the owner's process gave after checking ``owner`` itself, may skip it."""

    async def follow(self, session_id: str) -> Followed | None:
        """A live copy of the session's interaction that another process runs, for a rejoining client, and what
        keeps it up to date (to run while following); None if no process runs one. Raises RejoinFailed when there
        is one that cannot be reached."""

    async def interrupt_orphans(self, store: Store, session_id: str | None = None) -> None:
        """Record as interrupted the turns (of one session, or all) whose process is gone."""

    async def run(self, interactions: Interactions, store: Store) -> None:
        """What the process runs beside its requests (a cancel listener, a sweeper), until cancelled."""


class _NoLease:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_LEASE = _NoLease()


class LocalCoordinator:
    """One process on the embedded store: claims and cancels stay in the process. The store's file may still be
    shared by other worker processes, which this cannot reach: a cancel for them says so (set PARLEY_REDIS_URL)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim(self, interaction: Interaction) -> bool:
        return True

    def lease(self, interaction: Interaction) -> Lease:
        return _NO_LEASE

    async def release(self, interaction: Interaction) -> None:
        return None

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        streaming = await self.store.streaming_turn(session_id)
        return streaming is not None and interaction_id in (None, streaming)

    async def cancel_elsewhere(
        self,
        session_id: str,
        interaction_id: str | None,
        reason: CancelReason,
        owner: str | None,
        wait_out_silence: bool = False,
        check: OwnerCheck | None = None,
    ) -> bool:
        if check is not None:
            await check()  # first: nothing here can prove the owner
        if await self.streaming_elsewhere(session_id, interaction_id):
            raise CancelFailed(
                f"Failed to cancel interaction for session: {session_id}. It is streaming in another worker "
                "process, which the embedded store cannot reach: set PARLEY_REDIS_URL to run several processes."
            )
        return False

    async def follow(self, session_id: str) -> Followed | None:
        if await self.streaming_elsewhere(session_id, None):
            raise RejoinFailed(
                f"Failed to rejoin the reply of session: {session_id}. It is streaming in another worker process, "
                "which the embedded store cannot reach: set PARLEY_REDIS_URL to run several processes."
            )
        return None

    async def interrupt_orphans(self, store: Store, session_id: str | None = None) -> None:
        # Only at start-up (session_id None): turns left "streaming" by a process that died cannot finish any more.
        if session_id is None:
            await store.interrupt_turns()

    async def run(self, interactions: Interactions, store: Store) -> None:
        return None


class Interactions:
    """The interactions in progress in this process, at most one per session, each driven inside its own cancel
    scope. Cancel, session delete and client disconnect all go through here to the interaction's scope; the
    coordinator carries the one-per-session rule and the cancels to the other processes."""

    def __init__(self, coordinator: Coordinator, slots: StreamSlots | None = None, max_queued: int = 4) -> None:
        self._running: dict[str, Interaction] = {}
        # The messages that wait for their session (if_busy), in the order they run; and for each session with
        # any, an event set when its line may move (its interaction ended, or one left the line).
        self._lines: dict[str, list[Interaction]] = {}
        self._moved: dict[str, anyio.Event] = {}
        self.coordinator = coordinator
        self.slots: StreamSlots = slots or LocalStreamSlots(None)
        self.max_queued = max_queued

    def open(
        self,
        session_id: str,
        owner: str = "",
        if_busy: IfBusy = "reject",
        waiting: Callable[[Interaction], None] | None = None,
    ) -> _Open:
        """Take one of the owner's stream slots and claim the session for one interaction, for as long as the
        ``async with`` block runs. Raises TooManyStreams, then SessionBusy (``if_busy`` reject).

        When the session has a reply in progress, ``if_busy`` interrupt cancels it (as a cancel does) and waits
        for it to end; enqueue waits until it and the messages queued before have ended (TooManyQueued past
        ``max_queued``); both wait ahead of or behind the others in the session's line, and take a stream slot
        only once it is their turn. ``waiting`` is told of an interaction that waits: cancelling it takes it out
        of the line (Dequeued; SessionNotFound for "deleted")."""
        return _Open(self, session_id, owner, if_busy, waiting)

    def queued(self, session_id: str) -> int:
        """How many messages wait for the session in this process."""
        return len(self._lines.get(session_id, ()))

    def line(self, session_id: str) -> list[str]:
        """The interaction ids of the messages that wait for the session in this process, in the order they run."""
        return [waiting.id for waiting in self._lines.get(session_id, ())]

    def _move(self, session_id: str) -> None:
        moved = self._moved.pop(session_id, None)
        if moved is not None:
            moved.set()

    async def _wait_turn(self, interaction: Interaction, if_busy: IfBusy) -> None:
        """Wait in the session's line until ``interaction`` is first in it and nothing runs here (it stays in the
        line: the caller leaves it once it runs, so that nobody gets in between). Inside interaction.waiting."""
        session_id = interaction.session_id
        line = self._lines.setdefault(session_id, [])
        if if_busy == "interrupt":
            line.insert(0, interaction)
            running = self._running.get(session_id)
            if running is not None:
                running.cancel("cancelled")  # recorded as a cancel records it; then this one runs
        else:
            line.append(interaction)
        while self._running.get(session_id) is not None or line[0] is not interaction:
            moved = self._moved.get(session_id)
            if moved is None:
                moved = self._moved[session_id] = anyio.Event()
            await moved.wait()

    def _leave_line(self, interaction: Interaction) -> None:
        line = self._lines.get(interaction.session_id)
        if line is not None and interaction in line:
            line.remove(interaction)
            if not line:
                del self._lines[interaction.session_id]
            self._move(interaction.session_id)

    def cancel_queued(self, session_id: str, reason: CancelReason, interaction_id: str | None = None) -> bool:
        """Take the session's waiting messages (only ``interaction_id``, when given) out of its line."""
        found = False
        for waiting in list(self._lines.get(session_id, ())):
            if interaction_id is None or waiting.id == interaction_id:
                found = waiting.cancel(reason) or found
        return found

    async def release(self, interaction: Interaction) -> None:
        """End the interaction and free its session, here and in every process.

        The turn runner calls it as soon as the reply is recorded, before the client sees the end: the client's
        next message, to this process or another, must find the session idle. :meth:`open` calls it in any
        case. Only the first call does anything."""
        if interaction.over:
            return
        if self._running.get(interaction.session_id) is interaction:
            del self._running[interaction.session_id]
            if interaction.session_id in self._lines:
                self._move(interaction.session_id)  # the next in line
        if not interaction.status:  # it never got going (say, its session was gone): followers must not wait
            interaction.finish("interrupted")
        interaction.end()
        await self.coordinator.release(interaction)
        if self.slots.limit is not None:
            with anyio.CancelScope(shield=True):
                await self.slots.give_back(interaction.owner, interaction.id)

    def get(self, session_id: str) -> Interaction | None:
        return self._running.get(session_id)

    def cancel_here(
        self,
        session_id: str,
        interaction_id: str | None = None,
        reason: str = "cancelled",
        owner: str | None = None,
    ) -> bool:
        """Cancel the session's interaction if this process runs it (and it is ``interaction_id``, when given,
        and it runs for ``owner``, when given: another owner's cancel never reaches a stream)."""
        interaction = self._running.get(session_id)
        if interaction is None or (interaction_id is not None and interaction.id != interaction_id):
            return False
        if owner is not None and interaction.owner != owner:
            return False
        return interaction.cancel(CANCEL_REASONS.get(reason, "cancelled"))

    async def cancel(
        self,
        session_id: str,
        interaction_id: str | None = None,
        reason: CancelReason = "cancelled",
        owner: str | None = None,
        wait_out_silence: bool = False,
        check: OwnerCheck | None = None,
    ) -> CancelOutcome:
        """Cancel the session's running interaction, wherever it runs, if it runs for ``owner`` (None: whoever's
        it is). Raises CancelFailed if its process cannot be reached (with ``wait_out_silence``: nor waited out,
        see :meth:`Coordinator.cancel_elsewhere`). ``check`` (see :data:`OwnerCheck`) runs unless the interaction
        running for ``owner``, here or in the process that stopped it, shows the session is the owner's."""
        if interaction_id is not None and session_id in self._lines:
            for waiting in self._lines[session_id]:
                if waiting.id == interaction_id and (owner is None or waiting.owner == owner):
                    return (
                        "cancelled_here" if waiting.cancel(CANCEL_REASONS.get(reason, "cancelled")) else "not_running"
                    )
        running = self._running.get(session_id)
        if running is not None:
            # This process owns it: no need for the coordinator, so this works even while Redis is down.
            if check is not None and running.owner != owner:
                await check()
            cancelled = self.cancel_here(session_id, interaction_id, reason, owner)
            return "cancelled_here" if cancelled else "not_running"
        if await self.coordinator.cancel_elsewhere(session_id, interaction_id, reason, owner, wait_out_silence, check):
            return "cancelled_elsewhere"
        return "not_running"

    async def is_streaming(self, session_id: str) -> bool:
        return session_id in self._running or await self.coordinator.streaming_elsewhere(session_id, None)

    async def cancel_and_wait(self, session_id: str, reason: CancelReason, patience: float = 5.0) -> CancelOutcome:
        """Cancel the session's interaction and wait (``patience`` seconds at most) until it has ended. (Deleting
        the session also ends the messages that wait for it.)"""
        if reason == "deleted":
            self.cancel_queued(session_id, reason)
        outcome = await self.cancel(session_id, reason=reason)
        with anyio.move_on_after(patience):
            interaction = self._running.get(session_id)
            if interaction is not None:
                await interaction.wait_over()
            # Run by another process, its end shows only in the coordinator: watch the claim go.
            while outcome == "cancelled_elsewhere" and await self.coordinator.streaming_elsewhere(session_id, None):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return outcome

    async def wait_until_idle(self) -> None:
        """Wait until every interaction in this process has ended and recorded how."""
        while self._running:
            await next(iter(self._running.values())).wait_over()

    def __len__(self) -> int:
        return len(self._running)


class _Open:
    """``async with interactions.open(session_id, owner) as interaction``. (A class rather than an
    ``@asynccontextmanager``: every chat pays for it, and a generator costs more to drive.)"""

    __slots__ = ("if_busy", "interaction", "interactions", "waiting")

    def __init__(
        self,
        interactions: Interactions,
        session_id: str,
        owner: str,
        if_busy: IfBusy = "reject",
        waiting: Callable[[Interaction], None] | None = None,
    ) -> None:
        self.interactions = interactions
        self.interaction = Interaction(session_id, owner)
        self.if_busy = if_busy
        self.waiting = waiting

    async def __aenter__(self) -> Interaction:
        interactions, interaction = self.interactions, self.interaction
        session_id = interaction.session_id
        if self.if_busy != "reject" and (session_id in interactions._running or session_id in interactions._lines):
            await self._wait()
            return interaction
        # The slot first: an owner at its limit hears 429 whatever the session, so a busy session of another
        # owner's is not told apart from a missing one by this either.
        limited = await self._take_slot()
        try:
            busy = session_id in interactions._running or session_id in interactions._lines
            if busy or not await interactions.coordinator.claim(interaction):
                if self.if_busy == "reject":
                    raise SessionBusy(session_id)
                busy = True
        except BaseException:
            await self._give_back(limited)
            raise
        if busy:  # another process runs the session's reply: wait here, and take the slot when it is our turn
            await self._give_back(limited)
            await self._wait()
            return interaction
        interactions._running[session_id] = interaction
        return interaction

    async def _take_slot(self) -> bool:
        slots, interaction = self.interactions.slots, self.interaction
        limited = slots.limit is not None  # (unlimited, the default: no slot to take, nothing to pay)
        if limited and not await slots.take(interaction.owner, interaction.id):
            raise TooManyStreams(slots.limit or 0)
        return limited

    async def _give_back(self, limited: bool) -> None:
        if limited:
            await self.interactions.slots.give_back(self.interaction.owner, self.interaction.id)

    async def _wait(self) -> None:
        """if_busy interrupt or enqueue, with the session busy: wait in its line, then claim it."""
        interactions, interaction, if_busy = self.interactions, self.interaction, self.if_busy
        session_id = interaction.session_id
        line = interactions._lines.get(session_id)
        ahead = interactions._running.get(session_id) or (line[0] if line else None)
        if ahead is not None and ahead.owner != interaction.owner:
            raise SessionNotFound(session_id)  # another owner's session: neither stopped nor waited for
        if if_busy == "enqueue" and interactions.queued(session_id) >= interactions.max_queued:
            raise TooManyQueued(interactions.max_queued)
        if self.waiting is not None:
            self.waiting(interaction)
        limited = False
        try:
            with anyio.CancelScope() as interaction.waiting:
                await interactions._wait_turn(interaction, if_busy)
                limited = await self._take_slot()
                # Another process may run the session's reply (Redis): stop it, or wait for it, until ours.
                while not await interactions.coordinator.claim(interaction):
                    if if_busy == "interrupt":
                        await interactions.cancel(session_id, reason="cancelled", owner=interaction.owner)
                    await anyio.sleep(_CLAIM_POLL_SECONDS)
                interactions._running[session_id] = interaction
        except BaseException:
            await self._give_back(limited)
            raise
        finally:
            interaction.waiting = None
            interactions._leave_line(interaction)
        if interactions._running.get(session_id) is not interaction:  # taken out of the line
            if interaction.reason == "deleted":
                raise SessionNotFound(session_id)
            raise Dequeued(session_id)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.interactions.release(self.interaction)


# How often a message that waits polls for a session whose reply another process runs.
_CLAIM_POLL_SECONDS = 0.02
