"""Scale-out on Redis: the coordinator that keeps one interaction per session across processes (a claim with a
lease), carries cancels to the process that owns the stream (pub/sub), and lets a client rejoin a reply from any
process (the owner mirrors it into a Redis stream on demand)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from redis.asyncio import Redis

from parley.sessions.errors import ApiError, CancelFailed, RejoinFailed, StoreUnavailable
from parley.sessions.interactions import CANCEL_REASONS, CancelReason, Followed, Interaction, Interactions, OwnerCheck
from parley.sessions.redis import _DOWN, _reachable
from parley.sessions.store import Store, ignore_error

logger = logging.getLogger("parley")

# Only ever extends the claim: one that is gone is not made again (its owner stops instead). Answers 0 (gone),
# 1 (extended), or the reason of a cancel left for the interaction by a process its owner did not answer.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[2]) or 1
"""

# Frees the claim; a reply recorded "cancelled" says so for a while, for a canceller waiting on a silent owner.
# The canceller that stopped the reply through the cancel bus, if one did, hears its answer on its list (KEYS[3]).
_RELEASE = """
if ARGV[2] == 'cancelled' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
if KEYS[3] then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Sends a cancel (ARGV[1], JSON) to the process holding the session's claim, naming the interaction it holds, in
# the round trip that reads the claim. Not to this process (ARGV[2]), nor if the claim is another interaction
# than ARGV[3] (when given). Answers nil (no claim), or the claim and how many listeners heard it (-1: not sent).
_SEND_CANCEL = """
local claim = redis.call('GET', KEYS[1])
if not claim then return nil end
local process, interaction = string.match(claim, '^(.-):(.*)$')
if process == ARGV[2] or (ARGV[3] ~= '' and ARGV[3] ~= interaction) then return {claim, -1} end
local request = cjson.decode(ARGV[1])
request['interaction'] = interaction
return {claim, redis.call('PUBLISH', ARGV[4] .. process, cjson.encode(request))}
"""

# How long a canceller waits for an owner's answer on its channel before it leaves the cancel in Redis instead.
# (An owner that stopped the reply answers once it is recorded, which it waits for a second at most: see turns.)
_CANCEL_ANSWER_SECONDS = 2
_CANCELLED_TTL_MS = 60_000
_ANSWER_TTL = 30  # an answer its canceller gave up on


# How long a rejoin waits for the owner to start its mirror; how long a mirror outlives its interaction.
_FOLLOW_PATIENCE = 3.0
_FRAMES_TTL = 60


class RedisCoordinator:
    """One interaction per session across processes, and cancels that reach the process owning the stream.

    A claim is ``SET claim:<session> <process>:<interaction> NX PX <lease>``, renewed while the stream runs; if
    its process dies, the claim runs out and the session is free again. A renewal never re-creates a claim that
    is gone (run out during a Redis outage, or deleted with its session): the owner stops its reply instead, as
    it does when it cannot renew before its lease runs out, so two interactions of a session never overlap.
    A cancel for a stream owned elsewhere is published on the owner's channel; the owner cancels the scope and
    answers on a reply list whether it really had that interaction running: at once if not, and if it did, when
    it releases the claim (the reply recorded, the session free), in the same round trip.
    """

    def __init__(self, redis: Redis, prefix: str = "parley:", lease_seconds: float = 10.0) -> None:
        self.redis = redis
        self.on_error: Callable[[str], None] = ignore_error  # the app points it at its metrics
        self.prefix = prefix
        self.lease_ms = max(int(lease_seconds * 1000), 100)
        self.process_id = "proc_" + secrets.token_hex(8)
        self.listening = False
        self._mirrored: set[str] = set()  # interactions being mirrored into Redis for rejoins
        self._answer_at_release: dict[str, str] = {}  # interaction → the reply list of the cancel that stopped it

    def _claim_key(self, session_id: str) -> str:
        return f"{self.prefix}claim:{session_id}"

    def _channel(self, process_id: str) -> str:
        return f"{self.prefix}cancel:{process_id}"

    async def claim(self, interaction: Interaction) -> bool:
        with _reachable(self.on_error):
            value = f"{self.process_id}:{interaction.id}"
            return bool(await self.redis.set(self._claim_key(interaction.session_id), value, nx=True, px=self.lease_ms))

    def _cancel_key(self, interaction_id: str) -> str:
        return f"{self.prefix}cancel-left:{interaction_id}"

    def _cancelled_key(self, interaction_id: str) -> str:
        return f"{self.prefix}cancelled:{interaction_id}"

    async def renew(self, session_id: str, interaction_id: str) -> bool | str:
        """Extend the claim if it is still this interaction's; False if it is gone or another's. A cancel left
        for the interaction (see :meth:`request_cancel`) comes back as its reason."""
        value = f"{self.process_id}:{interaction_id}"
        keys = (self._claim_key(session_id), self._cancel_key(interaction_id))
        with _reachable(self.on_error):
            answer: Any = await self.redis.eval(_RENEW, 2, *keys, value, self.lease_ms)
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
        value = f"{self.process_id}:{interaction.id}"
        keys = [self._claim_key(interaction.session_id), self._cancelled_key(interaction.id)]
        answer = self._answer_at_release.pop(interaction.id, None)
        if answer is not None:
            keys.append(answer)
        with anyio.CancelScope(shield=True):
            try:
                with _reachable(self.on_error):
                    arguments = (value, interaction.status, _CANCELLED_TTL_MS, _ANSWER_TTL)
                    await self.redis.eval(_RELEASE, len(keys), *keys, *arguments)
            except ApiError:
                logger.warning("could not release session %s; its lease will run out", interaction.session_id)

    async def owner(self, session_id: str) -> tuple[str, str] | None:
        with _reachable(self.on_error):
            value: Any = await self.redis.get(self._claim_key(session_id))
        if value is None:
            return None
        process_id, _, interaction_id = str(value).partition(":")
        return process_id, interaction_id

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        owner = await self.owner(session_id)
        return owner is not None and interaction_id in (None, owner[1])

    async def cancel_elsewhere(
        self,
        session_id: str,
        interaction_id: str | None,
        reason: CancelReason,
        owner: str | None,
        wait_out_silence: bool = False,
        check: OwnerCheck | None = None,
    ) -> bool:
        """Ask the process that runs the stream to cancel it (if it runs for ``owner``, when given); True if it
        stopped the stream.

        A process that does not answer on its channel is dead, stopped, or between two subscriptions (Redis was
        away). The cancel is then left in Redis, where a live owner finds it at its next renewal. With
        ``wait_out_silence``, this waits until the claim is gone (a lease at most) and says whether the reply was
        recorded cancelled: a dead owner's reply ends ``interrupted``, and nothing was cancelled. Without it, or
        if the claim outlives that wait, it raises CancelFailed.

        ``check`` runs only when the owner's process has not answered True (which it does only for ``owner``'s
        interaction): a cancel that stops the reply does not wait for a read of the session first."""
        request_id = secrets.token_hex(8)
        reply_key = f"{self.prefix}cancel-reply:{request_id}"
        # The owner rides along: the receiving process checks it too, so another owner's cancel never stops it.
        # (The script names the interaction the claim holds, so that the cancel never stops a later one.)
        payload = json.dumps({"request": request_id, "session": session_id, "reason": reason, "owner": owner})
        claim_key = self._claim_key(session_id)
        with _reachable(self.on_error):
            sent: Any = await self.redis.eval(
                _SEND_CANCEL, 1, claim_key, payload, self.process_id, interaction_id or "", self._channel("")
            )
            reply = None
            if sent is not None and int(sent[1]) > 0:
                reply = await self.redis.blpop([reply_key], timeout=_CANCEL_ANSWER_SECONDS)
                if reply is not None and reply[1] == "1":
                    return True
            if check is not None:
                await check()
            if sent is None or int(sent[1]) < 0 or reply is not None:
                return False  # no stream, or not that one, or it is this process's, or its process said no
            claim = str(sent[0])
            running_id = claim.partition(":")[2]
            # (Left only once ``check`` has passed: the session is the canceller's owner's.)
            await self.redis.set(self._cancel_key(running_id), reason, px=self.lease_ms + 1000)
            if wait_out_silence:
                with anyio.move_on_after(self.lease_ms / 1000 + 1):
                    # The claim lives in Redis, which says nothing when it goes: look again until it has.
                    while await self.redis.get(claim_key) == claim:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                    return bool(await self.redis.exists(self._cancelled_key(running_id)))
        raise CancelFailed(
            f"Failed to cancel interaction for session: {session_id} (the process streaming it did not answer)"
        )

    # Rejoining from another process. The owner mirrors an interaction into a Redis stream only when someone asks
    # (a "follow" message on its channel): the whole reply from its first token, then each token as it comes, then
    # its end; the stream expires a while after the end. So the hot path pays nothing while nobody rejoins, and a
    # follower anywhere reads the stream with XREAD BLOCK, from the start, without missing what came before it asked
    # (pub/sub alone would lose what was published before the follower subscribed).

    def _frames_key(self, interaction_id: str) -> str:
        return f"{self.prefix}frames:{interaction_id}"

    async def follow(self, session_id: str) -> Followed | None:
        owner = await self.owner(session_id)
        if owner is None:
            return None
        process_id, interaction_id = owner
        with _reachable(self.on_error):
            asked = await self.redis.publish(
                self._channel(process_id), json.dumps({"follow": interaction_id, "session": session_id})
            )
        if not asked:
            return None  # its process is gone: its turn is recorded interrupted once its lease runs out
        mirror = Interaction(session_id)
        mirror.id = interaction_id
        reader = _MirrorReader(self, mirror)
        with anyio.move_on_after(_FOLLOW_PATIENCE):
            while not mirror.message_id and not mirror.status:
                await reader.read()
        if not mirror.message_id:
            if not await self.streaming_elsewhere(session_id, interaction_id):
                return None  # it ended meanwhile
            raise RejoinFailed(f"Failed to rejoin the reply of session: {session_id} (its process did not answer)")
        return mirror, reader.run

    async def _mirror(self, interaction: Interaction) -> None:
        key = self._frames_key(interaction.id)
        sent, first = 0, True
        try:
            while True:
                tokens, status = interaction.tokens[sent:], interaction.status
                if not (first or tokens or status):
                    # Nothing new since the last write (checked with no await since): wait for the next change.
                    await interaction.changed()
                    continue
                async with self.redis.pipeline(transaction=False) as pipe:
                    if first:
                        pipe.xadd(key, {"m": interaction.message_id})
                    for token in tokens:
                        pipe.xadd(key, {"t": token})
                    if status:
                        pipe.xadd(key, {"s": status, "e": interaction.error or ""})
                    pipe.expire(key, _FRAMES_TTL)
                    await pipe.execute()
                sent, first = sent + len(tokens), False
                if status:
                    return
        except _DOWN:
            logger.warning("lost Redis while mirroring interaction %s for a rejoin", interaction.id)
        finally:
            self._mirrored.discard(interaction.id)

    async def interrupt_orphans(self, store: Store, session_id: str | None = None) -> None:
        # Leases tell which owners are gone: their turns, and only theirs, are interrupted.
        await store.interrupt_turns(session_id)

    async def run(self, interactions: Interactions, store: Store) -> None:
        """The cancel listener, and a sweeper that interrupts the turns of processes that died."""
        async with anyio.create_task_group() as task_group:
            await task_group.start(self.listen, interactions, task_group)
            while True:
                await anyio.sleep(self.lease_ms / 1000)
                try:
                    await store.interrupt_turns()
                except ApiError:
                    logger.warning("lease sweeper: the store is unavailable; will retry")

    async def listen(
        self,
        interactions: Interactions,
        task_group: anyio.abc.TaskGroup,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve cancels and follow requests addressed to this process until cancelled; rides out Redis outages.
        Mirrors for rejoins run in ``task_group``."""
        started = False
        delay = 0.1
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel(self.process_id))
                    self.listening = True
                    delay = 0.1
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            await self._answer(message["data"], interactions, task_group)
            except _DOWN as exc:
                self.listening = False
                logger.warning("cancel listener lost Redis (%s); retrying", exc.__class__.__name__)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _answer(self, data: str, interactions: Interactions, task_group: anyio.abc.TaskGroup) -> None:
        try:
            request: dict[str, Any] = json.loads(data)
            if "follow" in request:
                interaction = interactions.get(request["session"])
                if interaction is not None and interaction.id == request["follow"] and interaction.message_id:
                    if interaction.id not in self._mirrored:
                        self._mirrored.add(interaction.id)
                        task_group.start_soon(self._mirror, interaction)
                return
            owner = request.get("owner")
            if owner is not None and not isinstance(owner, str):
                return
            session_id, reply_key = request["session"], f"{self.prefix}cancel-reply:{request['request']}"
            running = interactions.get(session_id)
            cancelled = interactions.cancel_here(session_id, request["interaction"] or None, request["reason"], owner)
        except (ValueError, KeyError, TypeError):
            return
        if cancelled and running is not None:
            # Answered at release (see release): the canceller's "true" then finds the reply recorded and the
            # session free, and the stopped stream's last round trips do not queue behind this answer's.
            self._answer_at_release[running.id] = reply_key
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(reply_key, "0")
            pipe.expire(reply_key, _ANSWER_TTL)
            await pipe.execute()


class _MirrorReader:
    """Fills a mirror of an interaction from the stream its owner writes, until its end. If the owner dies
    mid-reply (its claim goes, and no end comes), the mirror ends ``interrupted``."""

    def __init__(self, coordinator: RedisCoordinator, mirror: Interaction) -> None:
        self.coordinator = coordinator
        self.mirror = mirror
        self.key = coordinator._frames_key(mirror.id)
        self.last = "0-0"
        self.idle = 0

    async def read(self) -> None:
        mirror = self.mirror
        with _reachable(self.coordinator.on_error):
            answer: Any = await self.coordinator.redis.xread({self.key: self.last}, count=1000, block=1000)
        if not answer:
            self.idle += 1
            if self.idle >= 2 and not await self.coordinator.streaming_elsewhere(mirror.session_id, mirror.id):
                mirror.finish("interrupted")
            return
        self.idle = 0
        for entry_id, fields in answer[0][1]:
            self.last = entry_id
            if "t" in fields:
                mirror.add(fields["t"])
            elif "m" in fields:
                mirror.message_id = fields["m"]
            elif "s" in fields:
                mirror.error = fields["e"] or None
                mirror.finish(fields["s"])

    async def run(self) -> None:
        while not self.mirror.status:
            try:
                await self.read()
            except StoreUnavailable:
                self.mirror.finish("interrupted")
