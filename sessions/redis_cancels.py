"""The cancel bus on Redis: a cancel for a stream that another process owns goes to that process's channel, and
its answer comes back on a list of the canceller's. The same channel carries requests to mirror a reply for a
rejoin (see :mod:`sessions.redis_rejoin`). On a Redis Cluster the channels are sharded (``SPUBLISH`` and
``SSUBSCRIBE``): a message goes to the one node that serves the channel's slot, not to every node."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from parley.sessions.errors import CancelFailed
from parley.sessions.interactions import CANCEL_REASONS, CancelReason, Interactions, OwnerCheck
from parley.sessions.redis import _DOWN, _reachable, is_cluster
from parley.sessions.redis_claims import RedisClaims, parse
from parley.sessions.redis_keys import SessionKeys, process_channel

logger = logging.getLogger("parley")

# How long a canceller waits for an owner's answer on its channel before it leaves the cancel in Redis instead.
# (An owner that stopped the reply answers once it is recorded, which it waits for a second at most: see turns.)
_CANCEL_ANSWER_SECONDS = 2
_ANSWER_TTL = 30  # an answer its canceller gave up on

# What the bus hands a request to follow a reply (its JSON, decoded) to, with the task group mirrors run in.
FollowHandler = Callable[[dict[str, Any], Interactions, anyio.abc.TaskGroup], None]


class RedisCancelBus:
    """A cancel for a stream owned elsewhere is published on the owner's channel; the owner cancels the scope and
    answers on a reply list whether it really had that interaction running: at once if not, and if it did, when
    it releases the claim (the reply recorded, the session free), in the same round trip."""

    def __init__(self, redis: Any, prefix: str, claims: RedisClaims) -> None:
        self.redis = redis
        self.prefix = prefix
        self.claims = claims
        self.process_id = claims.process_id
        self.sharded = is_cluster(redis)

    def channel(self, process_id: str) -> str:
        return process_channel(self.prefix, process_id)

    async def publish(self, process_id: str, message: dict[str, Any]) -> int:
        """Send ``message`` to a process's channel; how many listeners heard it."""
        channel, data = self.channel(process_id), json.dumps(message)
        with _reachable(self.claims.on_error):
            return int(
                await (self.redis.spublish(channel, data) if self.sharded else self.redis.publish(channel, data))
            )

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
        keys = SessionKeys(self.prefix, session_id)
        reply_key = keys.cancel_reply(request_id)
        with _reachable(self.claims.on_error):
            mine = "" if owner is None else "1"
            found: Any = await self.claims.scripts.claim_and_owner(
                [keys.claim, keys.session, keys.queue], [interaction_id or "", owner or "", mine]
            )
            if found[2]:
                # A message that waited in the session's line (the owner's, if given): taken out of it. Its process
                # ends its request; the one whose message is first now, if the claim is free, may go.
                await self.publish(found[2], {"dequeue": session_id, "interaction": interaction_id, "reason": reason})
                if found[3]:
                    await self.publish(found[3], {"moved": session_id})
                return True
            claim: Any = found[0] or None
            session_owner = found[1] or None
            claim_owner = None if claim is None else parse(claim)[2]
            if owner is not None and (session_owner not in (None, owner) or claim_owner not in (None, owner)):
                # Another owner's session (the Redis store keeps it here), or another owner's claim (whatever the
                # store): answered as one that streams nowhere, in the same time, whether or not it streams (issue
                # 24 §3.10).
                claim = None
            listeners = -1
            if claim is not None:
                process_id, running_id, _ = parse(claim)
                if process_id != self.process_id and interaction_id in (None, running_id):
                    # The owner rides along: the receiving process checks it too, so another owner's cancel never
                    # stops it; and the interaction the claim holds, so that the cancel never stops a later one.
                    request = {"request": request_id, "session": session_id, "reason": reason, "owner": owner}
                    listeners = await self.publish(process_id, {**request, "interaction": running_id})
            reply = None
            if listeners > 0:
                reply = await self.redis.blpop([reply_key], timeout=_CANCEL_ANSWER_SECONDS)
                if reply is not None and reply[1] == "1":
                    return True
            if check is not None:
                await check()
            if claim is None or listeners < 0 or reply is not None:
                return False  # no stream, or not that one, or it is this process's, or its process said no
            # (Left only once ``check`` has passed: the session is the canceller's owner's.)
            await self.redis.set(keys.cancel_left(running_id), reason, px=self.claims.lease_ms + 1000)
            if wait_out_silence:
                with anyio.move_on_after(self.claims.lease_ms / 1000 + 1):
                    # The claim lives in Redis, which says nothing when it goes: look again until it has.
                    while await self.redis.get(keys.claim) == claim:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                    return bool(await self.redis.exists(keys.cancelled(running_id)))
        raise CancelFailed(
            f"Failed to cancel interaction for session: {session_id} (the process streaming it did not answer)"
        )

    async def listen(
        self,
        interactions: Interactions,
        task_group: anyio.abc.TaskGroup,
        on_follow: FollowHandler,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve cancels and follow requests addressed to this process until cancelled; rides out Redis outages.
        Follow requests go to ``on_follow``, with ``task_group`` for the mirrors it starts."""
        started = False
        delay = 0.1
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    channel = self.channel(self.process_id)
                    await (pubsub.ssubscribe(channel) if self.sharded else pubsub.subscribe(channel))
                    delay = 0.1
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        if self.sharded:
                            message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=1.0)
                        else:
                            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            await self._answer(message["data"], interactions, task_group, on_follow)
            except _DOWN as exc:
                logger.warning("cancel listener lost Redis (%s); retrying", exc.__class__.__name__)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _answer(
        self, data: str, interactions: Interactions, task_group: anyio.abc.TaskGroup, on_follow: FollowHandler
    ) -> None:
        try:
            request: dict[str, Any] = json.loads(data)
            if "follow" in request:
                on_follow(request, interactions, task_group)
                return
            if "moved" in request:  # the session's line may have moved (see sessions.redis_queue)
                interactions.wake(request["moved"])
                return
            if "dequeue" in request:  # a cancel or a delete took this process's waiting message(s) out of the line
                reason = CANCEL_REASONS.get(request["reason"], "cancelled")
                interactions.cancel_queued(request["dequeue"], reason, request.get("interaction") or None)
                return
            owner = request.get("owner")
            if owner is not None and not isinstance(owner, str):
                return
            session_id = request["session"]
            reply_key = SessionKeys(self.prefix, session_id).cancel_reply(request["request"])
            running = interactions.get(session_id)
            cancelled = interactions.cancel_here(session_id, request["interaction"] or None, request["reason"], owner)
        except (ValueError, KeyError, TypeError):
            return
        if cancelled and running is not None:
            # Answered at release (see RedisClaims.release): the canceller's "true" then finds the reply recorded
            # and the session free, and the stopped stream's last round trips do not queue behind this answer's.
            self.claims.answer_at_release[running.id] = reply_key
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(reply_key, "0")
            pipe.expire(reply_key, _ANSWER_TTL)
            await pipe.execute()
