"""Scale-out on Redis: the coordinator, a thin front over three parts, each in a module of its own.

- :mod:`sessions.redis_claims`: one interaction per session across processes (a claim with a lease);
- :mod:`sessions.redis_cancels`: the cancel bus, which carries cancels to the process that owns the stream;
- :mod:`sessions.redis_rejoin`: rejoining a reply from any process (its owner mirrors it into a Redis stream on
  demand);
- :mod:`sessions.redis_queue`: the line of messages that wait for a busy session, one for every process.

Their Lua scripts are in :mod:`sessions.redis_scripts`, their keys named in :mod:`sessions.redis_keys`. With the
Redis store on the same client, a short chat is two round trips to Redis: the claim rides in the store's first
script and the release in its last. With another store (data elsewhere, Redis only to coordinate), the claim and
the release are one round trip each.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc

from parley.sessions.coordinator import Lease, TurnStart, under_fresh_claim
from parley.sessions.errors import ApiError, SessionBusy, SessionNotFound
from parley.sessions.interactions import CancelReason, Followed, Interaction, Interactions, OwnerCheck
from parley.sessions.limits import StreamSlots
from parley.sessions.parts import Part
from parley.sessions.redis import RedisStore
from parley.sessions.redis_cancels import RedisCancelBus
from parley.sessions.redis_claims import RedisClaims
from parley.sessions.redis_limits import RedisStreamSlots
from parley.sessions.redis_queue import RedisQueue
from parley.sessions.redis_rejoin import RedisRejoin
from parley.sessions.redis_scripts import Scripts
from parley.sessions.store import Message, MessageStatus, Session, Store

logger = logging.getLogger("parley")

T = TypeVar("T")

# How long a chat waits out claims of other owners' (intruders', each gone after one store call), and how often it
# tries again meanwhile.
_INTRUDER_PATIENCE = 5.0
_INTRUDER_POLL_SECONDS = 0.005


class RedisCoordinator:
    """One interaction per session across processes (:class:`RedisClaims`), cancels that reach the process owning
    the stream (:class:`RedisCancelBus`), and rejoins from any process (:class:`RedisRejoin`)."""

    def __init__(
        self,
        redis: Any,
        prefix: str = "parley:",
        lease_seconds: float = 10.0,
        reader: Any | None = None,
        store: Store | None = None,
    ) -> None:
        """``reader``: a client of its own (one connection) for the followers of other processes' replies (see
        :mod:`sessions.redis_rejoin`); without it, they read on ``redis``. ``store``: the sessions' store, which
        tells an intruder's claim from a claim of the session's owner (see :meth:`_claim`)."""
        self.redis = redis
        self.store = store
        self.prefix = prefix
        self.process_id = "proc_" + secrets.token_hex(8)
        lease_ms = max(int(lease_seconds * 1000), 100)
        self.claims = RedisClaims(redis, Scripts(redis), prefix, self.process_id, lease_ms)
        self.claim_patience = lease_ms * 0.9 / 1000  # (see Coordinator.claim_patience: before the renewer's stop)
        self.bus = RedisCancelBus(redis, prefix, self.claims)
        self.rejoin = RedisRejoin(redis, prefix, self.claims, self.bus, reader)
        self.queue = RedisQueue(self.claims, self.bus)

    @property
    def on_error(self) -> Callable[[str], None]:
        """Told of each operation that failed because Redis was unreachable (the app points it at its metrics)."""
        return self.claims.on_error

    @on_error.setter
    def on_error(self, on_error: Callable[[str], None]) -> None:
        self.claims.on_error = on_error  # (the cancel bus and the rejoin mirror report through the claims)

    def _own(self, store: Store) -> RedisStore | None:
        """The store, if it is the Redis store on this coordinator's Redis (then they share their scripts)."""
        if isinstance(store, RedisStore) and store.redis is self.redis and store.prefix == self.prefix:
            return store
        return None

    def takes_slots(self, slots: StreamSlots) -> bool:
        return isinstance(slots, RedisStreamSlots) and slots.inline and slots.redis is self.redis

    async def claim(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        redis_slots = _redis_slots(slots)
        if self.store is None:  # (nothing to tell an intruder's claim by)
            await self.claims.claim(interaction, redis_slots)
        else:
            await self._claim(interaction, lambda: self.claims.claim(interaction, redis_slots), self.store)
        self.queue.entered(interaction)

    async def start_turn(
        self, interaction: Interaction, slots: StreamSlots | None, turn: TurnStart
    ) -> tuple[Session, list[Message]]:
        redis_slots = _redis_slots(slots)
        store = self._own(turn.store)
        if store is not None:
            claim = self.claims.to_take(interaction, redis_slots)
            user, assistant, limit, owner = turn.user, turn.assistant, turn.history_limit, interaction.owner
            # (The script checks the owner before the claim: busy, the session is the owner's.)
            started = await self._claim(interaction, lambda: store.begin(user, assistant, limit, owner, claim), None)
            self.claims.taken(interaction, redis_slots)
            self.queue.entered(interaction)
            return started
        await self._claim(interaction, lambda: self.claims.claim(interaction, redis_slots), turn.store)
        self.queue.entered(interaction)

        async def start() -> tuple[Session, list[Message]]:
            # With the claim taken, any turn of the session still streaming is an orphan. (A store that records
            # them in start_turn's own statement, PostgreSQL's, is spared the round trip.)
            if not getattr(turn.store, "interrupts_orphans_in_start_turn", False):
                await turn.store.interrupt_turns(interaction.session_id)
            return await turn.store.start_turn(turn.user, turn.assistant, turn.history_limit, owner=interaction.owner)

        async def release() -> None:
            await self._tell_first(interaction.session_id, await self.claims.release(interaction, redis_slots))

        return await under_fresh_claim(self.claim_patience, start, release)

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
        own = self._own(store)
        if own is None:
            await store.finish_turn(message_id, content, status, parts=parts, usage=usage)
            return
        redis_slots = _redis_slots(slots)
        release = self.claims.to_release(interaction, redis_slots)
        try:
            first = await own.end(message_id, content, status, release, parts=parts, usage=usage)
        except BaseException:
            # Not recorded in time (Redis away): the claim is still this process's to free, in release().
            self.claims.keep(interaction, release, redis_slots)
            raise
        await self._tell_first(interaction.session_id, first)

    async def _claim(self, interaction: Interaction, attempt: Callable[[], Awaitable[T]], store: Store | None) -> T:
        """``attempt`` (the claim, alone or in the turn's first script) until it is not refused for a claim of
        another owner's (issue 24 §3.4). Such a claim is an intruder's, taken before its store call found the
        session is not its owner's (then it goes at once), or the session is not this interaction's owner's (then
        this one is the intruder: SessionNotFound, as for a session that does not exist). ``store`` tells which;
        None: the attempt checked the owner before the claim. Nothing another owner does makes the owner's chat
        busy; a claim of the owner's own is SessionBusy at once."""
        try:
            return await attempt()  # (every chat: no cancel scope, no timer until a claim is in the way)
        except SessionBusy:
            pass
        checked, retried = store is None, False
        with anyio.move_on_after(_INTRUDER_PATIENCE):
            while True:
                holder = await self.claims.holder(interaction.session_id)
                if (holder is None and retried) or (holder is not None and holder[2] == interaction.owner):
                    # The owner's own claim, or no claim but messages that wait for the session (if_busy).
                    raise SessionBusy(interaction.session_id)
                if holder is None:
                    retried = True  # gone meanwhile (an intruder's claim goes in a moment): once more, at once
                else:
                    if not checked:
                        assert store is not None
                        if await store.get_session(interaction.session_id, interaction.owner) is None:
                            raise SessionNotFound(interaction.session_id)
                        checked = True
                    retried = False
                    await anyio.sleep(_INTRUDER_POLL_SECONDS)
                try:
                    return await attempt()
                except SessionBusy:
                    pass
        raise SessionBusy(interaction.session_id)

    def lease(self, interaction: Interaction) -> Lease:
        return self.claims.lease(interaction)

    async def aclose(self) -> None:
        """Close its connections (its client's, and the pipe beside it: see sessions.redis_pipe), for a coordinator
        used without :meth:`run`, which closes the pipe when it ends."""
        self.claims.scripts.close()
        await self.redis.aclose()

    async def release(self, interaction: Interaction, slots: StreamSlots | None) -> None:
        await self._tell_first(interaction.session_id, await self.claims.release(interaction, _redis_slots(slots)))

    async def _tell_first(self, session_id: str, process_id: str | None) -> None:
        # The claim is free: the process whose message waits first for the session is told at once. (This process's
        # own messages see it from Interactions.release, which moves the line here after this.)
        if process_id is not None and process_id != self.process_id:
            await self.queue.tell_first(session_id, process_id)

    async def enqueue(self, interaction: Interaction, front: bool, limit: int | None) -> int | None:
        return await self.queue.enqueue(interaction, front, limit)

    async def wait_moved(self, interaction: Interaction, moved: anyio.Event) -> None:
        await self.queue.wait(interaction, moved)

    async def dequeue(self, interaction: Interaction) -> None:
        await self.queue.dequeue(interaction)

    async def line(self, session_id: str) -> list[str] | None:
        return await self.queue.line(session_id)

    async def drop_line(self, session_id: str, reason: CancelReason) -> None:
        await self.queue.drop(session_id, reason)

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None, owner: str | None = None) -> bool:
        return await self.rejoin.streaming_elsewhere(session_id, interaction_id, owner)

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
        # Leases tell which owners are gone: their turns, and only theirs, are interrupted. The Redis store checks
        # the claim in the script that interrupts, PostgreSQL asks the claims (see service.py); another store is
        # asked about one session only while nobody claims it.
        if session_id is not None and self._own(store) is None and await self.claims.owner(session_id) is not None:
            return
        await store.interrupt_turns(session_id)

    async def run(self, interactions: Interactions, store: Store) -> None:
        """The cancel listener, the renewers of the leases of long replies, and a sweeper that interrupts the turns
        of processes that died."""
        try:
            async with anyio.create_task_group() as task_group:
                await task_group.start(self.listen, interactions, task_group)
                task_group.start_soon(self.claims.keep_leases)
                while True:
                    await anyio.sleep(self.claims.lease_ms / 1000)
                    try:
                        await self.interrupt_orphans(store)
                    except ApiError:
                        logger.warning("lease sweeper: the store is unavailable; will retry")
        finally:
            self.claims.scripts.close()  # (its pipe: the client's own connections close with the client)
            if self.rejoin.reader is not self.redis:
                with anyio.CancelScope(shield=True):
                    await self.rejoin.reader.aclose()  # (its one connection: the reader ran in this task group)

    async def listen(
        self,
        interactions: Interactions,
        task_group: anyio.abc.TaskGroup,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve cancels and follow requests addressed to this process until cancelled (mirrors for rejoins, and
        the reader of the replies this process's followers follow, run in ``task_group``)."""
        self.rejoin.task_group = task_group
        try:
            await self.bus.listen(interactions, task_group, self.rejoin.on_follow, task_status=task_status)
        finally:
            self.rejoin.task_group = None


class Detached:
    """What a parley on Redis runs beside its requests (:meth:`RedisCoordinator.run`: the listener for cancels and
    rejoins sent from other processes, the sweeper), when no lifespan of parley's runs it: mounted in a host app
    that does not run the mounted app's lifespan. Started by the first request, in a task group of its own, which
    one asyncio task holds (Redis means asyncio: see :func:`sessions.redis.require_asyncio`). This object owns that
    task: :meth:`aclose` cancels it and waits for its end. Without a lifespan nothing calls it, and the event loop
    does it when the server exits: ``asyncio.run`` (under uvicorn, hypercorn) cancels each task left and waits for
    it, so the task group's tasks end as a cancelled task group's do anywhere else."""

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        # A context of its own: it is started from a request, whose context (its request id) it must not keep.
        self._task = asyncio.get_running_loop().create_task(self._own(run), context=contextvars.Context())

    @staticmethod
    async def _own(run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()  # (its task group is run's own)
        except Exception:
            logger.exception("parley: what runs beside the requests stopped")

    async def aclose(self) -> None:
        self._task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([self._task])


def _redis_slots(slots: StreamSlots | None) -> RedisStreamSlots | None:
    return slots if isinstance(slots, RedisStreamSlots) else None
