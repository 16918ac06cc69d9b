"""``GET /api/v1/chat/{ui_session_id}/stream``: follow a reply that is running, from its first frame (or from a
``Last-Event-ID``) to its end, in SSE or in plain text. Following never cancels; any number may follow one reply.

The reply is read from an :class:`sessions.interactions.Interaction`: in the process that runs it, the interaction
itself; in another process (Redis), a mirror of it that :mod:`sessions.redis_rejoin` fills from the owner's Redis
stream. A mirror that stops before the reply's end (its reader lost Redis) cannot tell how the reply ended: the
follower then ends without a ``finish`` (the text so far, then the end of the body), and its client rejoins.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from parley import ui_messages
from parley.sessions.interactions import Interaction

_PLAIN_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def after_seq(last_event_id: str | None, interaction_id: str) -> int:
    """The seq a client already has from ``Last-Event-ID`` (``<interaction_id>:<seq>``); -1 for a full replay
    (no header, another interaction's id, or something unreadable)."""
    if not last_event_id:
        return -1
    event_interaction, _, seq = last_event_id.strip().rpartition(":")
    # isascii: isdigit() alone accepts '²', which int() refuses.
    if event_interaction != interaction_id or not (seq.isascii() and seq.isdigit()):
        return -1
    return int(seq)


class Follow:
    """The rejoin response: the interaction so far, then live until it ends or the client leaves."""

    def __init__(
        self,
        interaction: Interaction,
        *,
        plain: bool,
        after: int = -1,
        offset: int = 0,
        feed: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.interaction = interaction
        self.feed = feed
        self.plain = plain
        self.after = after
        self.offset = offset
        self.lost = False  # the mirror stopped before the reply's end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        interaction = self.interaction
        headers = _PLAIN_HEADERS if self.plain else ui_messages.SSE_HEADERS
        headers = [*headers, (b"x-interaction-id", interaction.id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with anyio.create_task_group() as task_group:
            # Leaving stops this follower only: the interaction goes on.
            task_group.start_soon(_stop_on_disconnect, receive, task_group.cancel_scope)
            if self.feed is not None:  # a mirror of an interaction that another process runs
                task_group.start_soon(self._fed, self.feed)
            if self.plain:
                await self._plain(send)
            else:
                await self._sse(send)
            task_group.cancel_scope.cancel()

    async def _fed(self, feed: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await feed()
        if not self.interaction.status:
            self.lost = True
            self.interaction.notify()

    async def _sse(self, send: Send) -> None:
        replay = ui_messages.Replay(self.interaction, self.after)
        while True:
            frames, ended = replay.more()
            if ended or (self.lost and not frames):
                # (Lost: what the mirror holds is sent, then the body ends with no finish.)
                await send({"type": "http.response.body", "body": frames, "more_body": False})
                return
            if frames:
                # Look again before waiting: what came during the send woke nobody.
                await send({"type": "http.response.body", "body": frames, "more_body": True})
            else:
                await self.interaction.changed()

    async def _plain(self, send: Send) -> None:
        tokens = self.interaction.tokens
        skip, sent = self.offset, 0
        while True:
            # The text alone, as the chat's plain text response sends it.
            text, sent = "".join(token for token in tokens[sent:] if type(token) is str), len(tokens)
            if skip:
                cut = min(skip, len(text))
                text, skip = text[cut:], skip - cut
            if text:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            if sent == len(tokens):
                if self.interaction.status or self.lost:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                await self.interaction.changed()


async def _stop_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
