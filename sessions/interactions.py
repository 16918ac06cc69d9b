"""The interactions in progress: one per session, each with the one cancel scope that drives its reply, and the
busy policy (what a message to a session already answering one gets). The coordinator that carries the
one-per-session rule and cancels across processes (local, or Redis) is :mod:`sessions.coordinator`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import anyio

from parley.agents.events import Event
from parley.sessions.coordinator import under_fresh_claim
from parley.sessions.errors import (
    CancelFailed,
    Dequeued,
    SessionBusy,
    SessionNotFound,
    TooManyQueued,
    TooManyStreams,
)
from parley.sessions.limits import LocalStreamSlots, StreamSlots
from parley.sessions.parts import Part
from parley.sessions.store import Message, MessageStatus, Session, Store, new_id

if TYPE_CHECKING:
    from parley.sessions.coordinator import Coordinator, TurnStart

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

    Its life, in order: ``agent_done`` turns true the moment the agent has said its last word (or failed): from
    then on a cancel no longer counts, so a cancel says it stopped the reply exactly when the reply is recorded as
    stopped. :meth:`finish` sets the reply's ``status`` (followers see the end). ``released`` turns true once the
    reply is recorded and the session freed (:meth:`Interactions.release`).
    """

    def __init__(self, session_id: str, owner: str = "") -> None:
        self.id = new_id("int_")
        self.session_id = session_id
        self.owner = owner  # whom the request acts for (auth.py); only that owner's cancels reach it
        self.scope = anyio.CancelScope()
        self.reason: CancelReason | None = None
        self.agent_done = False
        self.released = False
        self.unclaimed = False  # its claim was dropped before its turn started (see claim_dropped)
        self.message_id = ""  # the assistant's message in history, once the turn has started
        # While it waits for its session (if_busy enqueue or interrupt): a cancel takes it out of the line. Its place
        # in the line: the lines keep their messages in this order (the coordinator's, when it shares the line).
        self.waiting: anyio.CancelScope | None = None
        self.place = 0
        self.shared_place = False  # its place is in the coordinator's line (its claim goes by that line's order)
        # A waiting message whose claim is on its way is the session's reply in progress only if its claim holds: a
        # cancel of that reply (or an interrupt) stops it then, and only then (see cancel_running).
        self.claiming = False
        self.stop_once_claimed: CancelReason | None = None
        # The reply so far, as the agent's events (text tokens and the rest): rejoining clients read it from here.
        self.tokens: list[Event] = []
        self.status = ""  # the history status, once done
        self.error: str | None = None  # what a failure after the first token said, for renderers that can tell
        # Events made only when someone waits: most interactions are neither followed nor watched.
        self.waiter: anyio.Event | None = None  # set when a follower waits for the next change
        self._released_event: anyio.Event | None = None

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the reply's scope. True only if this call stopped a reply that was still running."""
        if self.agent_done or self.reason is not None:
            return False
        self.reason = reason
        if self.waiting is not None:
            self.waiting.cancel()  # (it never started: it leaves the line, and nothing of it is recorded)
        self.scope.cancel()
        return True

    def cancel_running(self, reason: CancelReason) -> bool:
        """Cancel it as the session's reply in progress (not as the message it is): see ``claiming``."""
        if self.claiming:
            self.stop_once_claimed = reason
            return False
        return self.cancel(reason)

    def notify(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    def add(self, token: Event) -> None:
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

    def mark_released(self) -> None:
        """Recorded, and its session freed (by :meth:`Interactions.release`)."""
        self.released = True
        if self._released_event is not None:
            self._released_event.set()

    def claim_dropped(self) -> None:
        """Its claim was not taken, or was given back before the turn started: whoever waits for it to go goes on,
        but it is not released (under if_busy it may wait for the session, then claim it again: :meth:`claimed`)."""
        self.unclaimed = True
        event, self._released_event = self._released_event, None
        if event is not None:
            event.set()

    def claimed(self) -> None:
        self.unclaimed = False

    async def wait_released(self) -> None:
        """Until it is released, or its claim was dropped."""
        if self.released or self.unclaimed:
            return
        if self._released_event is None:
            self._released_event = anyio.Event()
        await self._released_event.wait()


# The web layer's check that the session is the canceller's owner's (it raises SessionNotFound if not): run only
# when nothing else has shown it, before a cancel answers "not running" or leaves anything on the session's behalf.
OwnerCheck = Callable[[], Awaitable[object]]

# A copy of an interaction that another process runs, and the task that fills it as that one goes on.
Followed = tuple[Interaction, Callable[[], Coroutine[Any, Any, None]]]


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
        ``async with`` block runs; with a :class:`TurnStart` set on it (``opening.turn``) before, start the turn
        too (its answer is then ``opening.started``). Raises TooManyStreams, then SessionBusy.

        This is where a message into a busy session learns what ``if_busy`` makes of it: reject raises
        SessionBusy; interrupt cancels the reply in progress (as a cancel does) and waits for it to end;
        enqueue waits until it and the messages queued before have ended (TooManyQueued past ``max_queued``).
        Both wait in the session's line (an interrupt at its head; with a coordinator that shares it, one line
        for every process), and take a stream slot only once it is their turn. ``waiting`` is told of an
        interaction that waits: cancelling it takes it out of the line (Dequeued; SessionNotFound for
        "deleted"), and nothing of it is recorded."""
        return _Open(self, session_id, owner, if_busy, waiting)

    def queued(self, session_id: str) -> int:
        """How many messages wait for the session in this process."""
        return len(self._lines.get(session_id, ()))

    async def line(self, session_id: str) -> list[str]:
        """The interaction ids of the messages that wait for the session (in every process, when the coordinator
        shares the line), in the order they run."""
        shared = await self.coordinator.line(session_id)
        return shared if shared is not None else [waiting.id for waiting in self._lines.get(session_id, ())]

    def wake(self, session_id: str) -> None:
        """The session's line may have moved: its messages that wait here look again."""
        moved = self._moved.pop(session_id, None)
        if moved is not None:
            moved.set()

    def _moved_event(self, session_id: str) -> anyio.Event:
        """Set at the next :meth:`wake` (taken before a look, so that a wake during the look is not missed)."""
        moved = self._moved.get(session_id)
        if moved is None:
            moved = self._moved[session_id] = anyio.Event()
        return moved

    def _join_line(self, interaction: Interaction, front: bool) -> None:
        line = self._lines.setdefault(interaction.session_id, [])
        if front:
            interaction.place = line[0].place - 1 if line else 0
            line.insert(0, interaction)
            running = self._running.get(interaction.session_id)
            if running is not None:
                running.cancel_running("cancelled")  # recorded as a cancel records it; then this one runs
        else:
            interaction.place = line[-1].place + 1 if line else 0
            line.append(interaction)

    def _take_place(self, interaction: Interaction, place: int) -> None:
        """Its place in the shared line: this process's line keeps the same order."""
        interaction.place = place
        line = self._lines.get(interaction.session_id)
        if line is not None:
            line.sort(key=lambda waiting: waiting.place)

    def _may_go(self, interaction: Interaction) -> bool:
        """First in the session's line here, and nothing runs here (the coordinator's claim tells the rest)."""
        line = self._lines.get(interaction.session_id)
        return interaction.session_id not in self._running and line is not None and line[0] is interaction

    def _leave_line(self, interaction: Interaction) -> None:
        line = self._lines.get(interaction.session_id)
        if line is not None and interaction in line:
            line.remove(interaction)
            if not line:
                del self._lines[interaction.session_id]
            self.wake(interaction.session_id)

    def cancel_queued(self, session_id: str, reason: CancelReason, interaction_id: str | None = None) -> bool:
        """Take the session's waiting messages (only ``interaction_id``, when given) out of its line."""
        found = False
        for waiting in list(self._lines.get(session_id, ())):
            if interaction_id is None or waiting.id == interaction_id:
                found = waiting.cancel(reason) or found
        return found

    async def end_turn(
        self,
        interaction: Interaction,
        store: Store,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        """Record the reply (``store.finish_turn``), and free the session with it where the coordinator can (then
        :meth:`release` is left with this process's own bookkeeping)."""
        slots = self.slots if self.slots.limit is not None else None
        await self.coordinator.end_turn(
            interaction, slots, store, message_id, content, status, parts=parts, usage=usage
        )

    async def release(self, interaction: Interaction) -> None:
        """End the interaction and free its session, here and in every process.

        The turn runner calls it as soon as the reply is recorded, before the client sees the end: the client's
        next message, to this process or another, must find the session idle. :meth:`open` calls it in any
        case. Only the first call does anything."""
        if interaction.released:
            return
        session_id = interaction.session_id
        if self._running.get(session_id) is interaction:
            del self._running[session_id]
        if not interaction.status:  # it never got going (say, its session was gone): followers must not wait
            interaction.finish("interrupted")
        interaction.mark_released()
        slots = self.slots
        try:
            await self.coordinator.release(interaction, slots if slots.limit is not None else None)
            if slots.limit is not None:
                with anyio.CancelScope(shield=True):
                    await self.slots.give_back(interaction.owner, interaction.id)
        finally:
            if session_id in self._lines:
                self.wake(session_id)  # the next in line (once the claim and the slot are free)

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
        if interaction_id is None:
            return interaction.cancel_running(CANCEL_REASONS.get(reason, "cancelled"))
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
                    cancelled = waiting.cancel(CANCEL_REASONS.get(reason, "cancelled"))
                    return "cancelled_here" if cancelled else "not_running"
        running = self._running.get(session_id)
        if running is not None and running.claiming:
            # A waiting message that tries to claim the session now: the reply in progress, if any, may run elsewhere
            # (if not, it may be this one, if its claim holds: then cancel_here stops it once it does).
            if await self.coordinator.cancel_elsewhere(
                session_id, interaction_id, reason, owner, wait_out_silence, check
            ):
                return "cancelled_elsewhere"
            running, check = self._running.get(session_id), None  # (cancel_elsewhere ran it)
        if running is not None:
            # This process owns it: no need for the coordinator, so this works even while Redis is down. Only a
            # started interaction shows whose the session is: a claim is taken before the owner is known, and
            # another owner's (an intruder's, whose start is about to fail) must change nothing for the owner.
            if check is not None and (running.owner != owner or not running.message_id):
                await check()
                check = None  # (the session is the canceller's)
            if (running.owner == owner or owner is None) and interaction_id in (None, running.id):
                cancelled = self.cancel_here(session_id, interaction_id, reason, owner)
                return "cancelled_here" if cancelled else "not_running"
            # Another owner's claim in this process, not started: the owner's reply, if any, runs elsewhere. (Or
            # another interaction: it may wait in the line that the coordinator shares.)
        if await self.coordinator.cancel_elsewhere(session_id, interaction_id, reason, owner, wait_out_silence, check):
            return "cancelled_elsewhere"
        return "not_running"

    async def is_streaming(self, session_id: str, owner: str | None = None) -> bool:
        """Whether the session's reply runs (for ``owner``, if given: nothing another owner does shows)."""
        running = self._running.get(session_id)
        if running is not None:
            return owner is None or running.owner == owner
        return await self.coordinator.streaming_elsewhere(session_id, None, owner)

    async def cancel_and_wait(self, session_id: str, reason: CancelReason, patience: float = 5.0) -> CancelOutcome:
        """Cancel the session's interaction and wait (``patience`` seconds at most) until it has ended. (Deleting
        the session also ends the messages that wait for it.)"""
        if reason == "deleted":
            self.cancel_queued(session_id, reason)
            await self.coordinator.drop_line(session_id, reason)
        outcome = await self.cancel(session_id, reason=reason)
        with anyio.move_on_after(patience):
            interaction = self._running.get(session_id)
            if interaction is not None:
                await interaction.wait_released()
            # Run by another process, its end shows only in the coordinator: watch the claim go.
            while outcome == "cancelled_elsewhere" and await self.coordinator.streaming_elsewhere(session_id, None):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return outcome

    async def wait_until_idle(self) -> None:
        """Wait until every interaction in this process has ended and recorded how."""
        while self._running:
            await next(iter(self._running.values())).wait_released()


# How long a chat waits for another owner's claim of its session, not started, to go (it goes after one store call).
_INTRUDER_PATIENCE = 5.0


class _Open:
    """``async with interactions.open(session_id, owner) as interaction``. (A class rather than an
    ``@asynccontextmanager``: every chat pays for it, and a generator costs more to drive.)"""

    __slots__ = ("asked", "if_busy", "interaction", "interactions", "started", "turn", "waiting")

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
        self.turn: TurnStart | None = None
        self.started: tuple[Session, list[Message]] | None = None
        self.asked: Message | None = None  # a replaced turn's user message (the one kept, for a regenerate)
        self.if_busy = if_busy
        self.waiting = waiting

    async def __aenter__(self) -> Interaction:
        interactions, interaction = self.interactions, self.interaction
        session_id = interaction.session_id
        if self.if_busy != "reject" and (session_id in interactions._running or session_id in interactions._lines):
            await self._wait()
            return interaction
        try:
            await self._enter(first_in_line=False)
        except SessionBusy:  # (another process runs the session's reply)
            if self.if_busy == "reject":
                raise
            await self._wait(busy_elsewhere=True)
        return interaction

    async def _enter(self, *, first_in_line: bool) -> None:
        interactions, interaction = self.interactions, self.interaction
        session_id, owner, slots = interaction.session_id, interaction.owner, interactions.slots
        coordinator = interactions.coordinator
        # The slot first: an owner at its limit hears 429 whatever the session, so a busy session of another
        # owner's is not told apart from a missing one by this either. (Unlimited, the default: nothing to pay.)
        limited = slots.limit is not None
        inline = limited and coordinator.takes_slots(slots)  # taken with the claim, in its round trip
        if limited and not inline and not await slots.take(owner, interaction.id):
            raise TooManyStreams(slots.limit or 0)
        holder = interactions._running.get(session_id)
        if holder is not None and holder.owner != owner and not holder.message_id and self.turn is not None:
            # Another owner's claim, not started: the intruder's (its start will find the session is not its
            # owner's, at once), or ours if the session is not our owner's. (One store read, on this rare path.)
            if await self.turn.store.get_session(session_id, owner) is not None:
                with anyio.move_on_after(_INTRUDER_PATIENCE):
                    while holder is not None and holder.owner != owner and not holder.message_id:
                        await holder.wait_released()  # (and the next one, if the intruder keeps trying)
                        holder = interactions._running.get(session_id)
        if session_id in interactions._running or (not first_in_line and session_id in interactions._lines):
            if inline and not await slots.take(owner, interaction.id):
                raise TooManyStreams(slots.limit or 0)
            await self._undo()
            raise SessionBusy(session_id)
        interactions._running[session_id] = interaction
        interaction.claimed()
        interaction.claiming = first_in_line and interaction.shared_place
        try:
            turn, taken = self.turn, slots if inline else None
            if turn is None:
                await coordinator.claim(interaction, taken)
            elif turn.replace is None:
                self.started = await coordinator.start_turn(interaction, taken, turn)
            else:
                # The claim first, then the drop and the new turn's start in one store step: a chat refused as
                # busy drops nothing.
                await coordinator.claim(interaction, taken)
                replace = partial(
                    turn.store.replace_turn,
                    turn.replace,
                    turn.user,
                    turn.assistant,
                    turn.history_limit,
                    owner=owner,
                    missing_ok=turn.missing_ok,
                    keep=turn.keep,
                )
                release = partial(coordinator.release, interaction, taken)
                session, earlier, self.asked = await under_fresh_claim(coordinator.claim_patience, replace, release)
                self.started = session, earlier
        except BaseException:
            interaction.claiming, interaction.stop_once_claimed = False, None
            if interactions._running.get(session_id) is interaction:
                del interactions._running[session_id]
                if session_id in interactions._lines:
                    interactions.wake(session_id)
            interaction.claim_dropped()  # (a chat waiting for this claim to go goes on)
            await self._undo()
            raise
        if interaction.claiming:
            interaction.claiming = False
            if interaction.stop_once_claimed is not None:
                interaction.cancel(interaction.stop_once_claimed)  # (it holds the claim: it is the reply in progress)

    async def _wait(self, busy_elsewhere: bool = False) -> None:
        """if_busy interrupt or enqueue, with the session busy (``busy_elsewhere``: the coordinator just said so):
        wait in its line, then enter."""
        interactions, interaction, if_busy = self.interactions, self.interaction, self.if_busy
        session_id = interaction.session_id
        line = interactions._lines.get(session_id)
        ahead = interactions._running.get(session_id) or (line[0] if line else None)
        if ahead is not None and ahead.owner != interaction.owner:
            # Another owner's interaction ahead: the session is not ours (neither stopped nor waited for), or it is
            # an intruder's claim, whose start finds the session is not its owner's. Only the store can tell them
            # apart; this rare path asks it.
            if self.turn is None or await self.turn.store.get_session(session_id, interaction.owner) is None:
                raise SessionNotFound(session_id)
        front = if_busy == "interrupt"
        if not front and interactions.queued(session_id) >= interactions.max_queued:
            raise TooManyQueued(interactions.max_queued)
        if self.waiting is not None:
            self.waiting(interaction)
        coordinator = interactions.coordinator
        entered = False
        try:
            with anyio.CancelScope() as waiting:
                interaction.waiting = waiting
                interactions._join_line(interaction, front)
                place = await coordinator.enqueue(interaction, front, None if front else interactions.max_queued)
                if place is not None:
                    interaction.shared_place = True
                    interactions._take_place(interaction, place)
                stop_first = front and busy_elsewhere  # (no need to be told again that the session is busy)
                while interaction.reason is None:
                    moved = interactions._moved_event(session_id)
                    if interactions._may_go(interaction):
                        if stop_first:
                            stop_first = False
                            await self._interrupt_elsewhere()
                        # Its turn here: from now a cancel stops it as it stops a running reply (it is recorded so).
                        interaction.waiting = None
                        try:
                            await self._enter(first_in_line=True)
                            entered = True
                            break
                        except SessionBusy:  # another process runs the session's reply, or has a message first
                            interaction.waiting = waiting
                            if front and await self._interrupt_elsewhere():
                                continue  # (its process answered once the reply was recorded and the session free)
                    await coordinator.wait_moved(interaction, moved)
        finally:
            interaction.waiting = None
            if not entered:
                await coordinator.dequeue(interaction)
            interactions._leave_line(interaction)  # (after the shared line: the next here finds it moved)
        if not entered:  # taken out of the line
            if interaction.reason == "deleted":
                raise SessionNotFound(session_id)
            if interaction.reason == "lease lost" and self.turn is not None:
                # Its place in the shared line is gone, and the word why did not reach this process: a delete, or
                # a cancel. (One store read, on this rare path.)
                if await self.turn.store.get_session(session_id, interaction.owner) is None:
                    raise SessionNotFound(session_id)
            raise Dequeued(session_id)

    async def _interrupt_elsewhere(self) -> bool:
        """Stop the reply that another process runs for the session; True once it is recorded and the session free.
        (A process that does not answer holds its claim a lease at most: the line moves on then.)"""
        interaction = self.interaction
        try:
            outcome = await self.interactions.cancel(interaction.session_id, owner=interaction.owner)
        except CancelFailed:
            return False
        return outcome == "cancelled_elsewhere"

    async def _undo(self) -> None:
        if self.interactions.slots.limit is not None:
            await self.interactions.slots.give_back(self.interaction.owner, self.interaction.id)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.interactions.release(self.interaction)
