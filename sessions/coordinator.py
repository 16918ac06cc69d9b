"""The coordinator: what the processes serving one store share so that the rules hold across them (claims, the
start and end of a turn in as few round trips as the store allows, cancels, rejoins, lines of waiting messages),
and its implementation for one process (:class:`LocalCoordinator`). :mod:`sessions.redis_coordinator` carries it
across processes on Redis; :mod:`sessions.interactions` holds the interactions it coordinates."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio

from parley.sessions.errors import CancelFailed, RejoinFailed, StoreUnavailable
from parley.sessions.limits import StreamSlots
from parley.sessions.parts import Part
from parley.sessions.store import Message, MessageStatus, Session, Store

if TYPE_CHECKING:
    from parley.sessions.interactions import CancelReason, Followed, Interaction, Interactions, OwnerCheck

T = TypeVar("T")

# What a chat whose store call outlasted its claim's lease is told (see Coordinator.claim_patience).
_STORE_TOO_SLOW_FOR_THE_CLAIM = "The session store did not answer within the session's lease; try again shortly."

# Holds a claim while a reply runs (``async with``): for the Redis coordinator, a renewer task.
Lease = AbstractAsyncContextManager[None]


async def under_fresh_claim(
    patience: float | None, store_call: Callable[[], Awaitable[T]], release: Callable[[], Awaitable[None]]
) -> T:
    """``store_call()``'s answer, made with a claim just taken (the start of a turn, or its replacement), or the
    claim released (``release()``) if it fails. Nothing renews a claim until its turn has started: a store that
    does not answer within ``patience`` (Coordinator.claim_patience; PostgreSQL away, its pool waiting for a
    connection) must not start a reply whose claim has run out, which any process would then record interrupted as
    an orphan while it streams: that is StoreUnavailable."""
    try:
        with anyio.fail_after(patience):
            return await store_call()
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await release()
        if isinstance(exc, TimeoutError):
            raise StoreUnavailable(_STORE_TOO_SLOW_FOR_THE_CLAIM) from None
        raise


@dataclass(frozen=True)
class TurnStart:
    """What starting a turn writes (see :meth:`sessions.store.Store.start_turn`): given to
    :meth:`Interactions.open`, the turn starts with the claim, in as few round trips as the coordinator and the
    store allow."""

    store: Store
    user: Message
    assistant: Message
    history_limit: Callable[[Session], int]
    # A regenerate or an edit: Store.replace_turn, once the claim is taken, in place of start_turn.
    replace: str | None = None
    missing_ok: bool = False
    keep: bool = False


class Coordinator(Protocol):
    """What the processes serving one store share so that the rules hold across them. One is chosen at
    start-up: :class:`LocalCoordinator` (one process, embedded store) or
    :class:`sessions.redis_coordinator.RedisCoordinator`.
    """

    @property
    def claim_patience(self) -> float | None:
        """How long a store call made with a claim just taken may take (None: no limit): nothing renews a claim
        until its turn has started, so a store that answers after the claim's lease must not start the turn."""

    def takes_slots(self, slots: StreamSlots) -> bool:
        """Whether :meth:`claim` and :meth:`start_turn` take the owner's stream slot themselves, in the claim's
        round trip, when given ``slots`` (and :meth:`end_turn` or :meth:`release` give it back)."""

    async def claim(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        """Claim the interaction's session across processes (with ``slots``, take the owner's stream slot first).
        Raises TooManyStreams, SessionBusy (another process holds it)."""

    async def start_turn(
        self, interaction: Interaction, slots: StreamSlots | None, turn: TurnStart
    ) -> tuple[Session, list[Message]]:
        """:meth:`claim`, then ``turn.store.start_turn`` (whose answer this is); one round trip when the store is
        the coordinator's own. A turn of the session still ``streaming`` once the claim is taken is an orphan:
        it is recorded interrupted first."""

    async def end_turn(
        self,
        interaction: Interaction,
        slots: StreamSlots | None,
        store: Store,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        """``store.finish_turn``, and the claim freed with it when the store is the coordinator's own (one round
        trip). :meth:`release` still follows (and does nothing when this freed the claim)."""

    def lease(self, interaction: Interaction) -> Lease:
        """Keep the claim while the reply runs; if the claim is lost, cancel the interaction ("lease lost")."""

    async def release(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        """Free the claim (and the stream slot taken with it), if still held. Never raises, and finishes even when
        cancelled (it shields what it must)."""

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None, owner: str | None = None) -> bool:
        """Does another process run the session's interaction (``interaction_id``, if given; for ``owner``, if
        given: another owner's claim, an intruder's about to be refused, is no reply of the session's)?"""

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

    async def enqueue(self, interaction: Interaction, front: bool, limit: int | None) -> int | None:
        """Put a message that waits for its session in the session's line that every process shares, at its back
        (or its ``front``: an interrupt); its place there. None when there is no such line (the process's own is
        the only one). Raises TooManyQueued when ``limit`` messages wait already. From then on the coordinator's
        claim goes only to the message first in that line."""

    async def wait_moved(self, interaction: Interaction, moved: anyio.Event) -> None:
        """Until ``moved`` is set (the session's line may have moved: this process sets it, and the coordinator
        when another process moves the shared line), or for a while at most; meanwhile the interaction keeps its
        place (if it lost it, it is cancelled, "lease lost")."""

    async def dequeue(self, interaction: Interaction) -> None:
        """Take a message out of the shared line (it leaves without running). Never raises, and finishes even
        when cancelled."""

    async def line(self, session_id: str) -> list[str] | None:
        """The interaction ids of the messages that wait for the session, in every process, in the order they
        run; None when there is no shared line."""

    async def drop_line(self, session_id: str, reason: CancelReason) -> None:
        """End every message that waits for the session, in every process (its session is deleted). Never
        raises."""


class _NoLease:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_LEASE = _NoLease()


class LocalCoordinator:
    """One process on the embedded store: claims and cancels stay in the process. The store's file may still be
    shared by other worker processes, which this cannot reach: a cancel for them says so (set PARLEY_REDIS_URL)."""

    claim_patience = None  # (a claim in the process: no lease to run out)

    def __init__(self, store: Store) -> None:
        self.store = store

    def takes_slots(self, slots: StreamSlots) -> bool:
        return False

    async def claim(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        return None  # (the one process's own check, in Interactions.open, is the claim)

    async def start_turn(
        self, interaction: Interaction, slots: StreamSlots | None, turn: TurnStart
    ) -> tuple[Session, list[Message]]:
        return await turn.store.start_turn(turn.user, turn.assistant, turn.history_limit, owner=interaction.owner)

    async def end_turn(
        self,
        interaction: Interaction,
        slots: StreamSlots | None,
        store: Store,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        await store.finish_turn(message_id, content, status, parts=parts, usage=usage)

    def lease(self, interaction: Interaction) -> Lease:
        return _NO_LEASE

    async def release(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        return None

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None, owner: str | None = None) -> bool:
        streaming = await self.store.streaming_turn(session_id)  # (a turn started: the session's owner's)
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

    async def enqueue(self, interaction: Interaction, front: bool, limit: int | None) -> int | None:
        return None

    async def wait_moved(self, interaction: Interaction, moved: anyio.Event) -> None:
        await moved.wait()

    async def dequeue(self, interaction: Interaction) -> None:
        return None

    async def line(self, session_id: str) -> list[str] | None:
        return None

    async def drop_line(self, session_id: str, reason: CancelReason) -> None:
        return None
