"""The chat response: a turn, run by :class:`sessions.turns.TurnRunner`, framed for the wire by a renderer.

A renderer turns the runner's events (started, each event, ended) into ASGI messages; a new wire format is one new
renderer. :class:`PlainText` is the spec's format; :mod:`parley.ui_messages` holds the AI SDK's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel
from starlette.types import Message, Receive, Scope, Send

from parley.agents import AgentError
from parley.agents.events import Event
from parley.sessions.interactions import Interaction
from parley.sessions.turns import TurnRequest, TurnRunner

logger = logging.getLogger("parley")

OnDisconnect = Literal["cancel", "continue"]


class StreamAborted(Exception):
    """Raised to the server to abort a chat response whose agent failed after the first token."""

    logged_by_parley = True  # (the server's own report of it is dropped: see parley/logs.py)


class ClientDropped(StreamAborted):
    """Raised to the server to close the connection of a client that stopped reading a reply that went on."""


class ResponseRenderer:
    """What every renderer of a chat response shares (each is a :class:`sessions.turns.Renderer` that writes an HTTP
    response): the ASGI ``send``, and what happens when its client goes away.

    Under ``on_disconnect="continue"`` the reply must not wait for its client, which may stay connected and stop
    reading: its messages go to a queue that :func:`_write_behind` sends at the client's pace, and a client that
    takes more than ``stall_seconds`` over one send is dropped (nothing more is sent; its connection is closed
    when the reply ends, with no end of stream: it may rejoin). The queue holds at most that many seconds of the
    reply, which the interaction keeps in full anyway."""

    def __init__(
        self,
        send: Send,
        on_disconnect: OnDisconnect = "cancel",
        keepalive_seconds: float = 0.0,
        stall_seconds: float = 30.0,
    ) -> None:
        self.send = self.write = send
        self.on_disconnect = on_disconnect
        self.keepalive_seconds = keepalive_seconds
        self.stall_seconds = stall_seconds
        self.interaction: Interaction | None = None
        self.queued: Interaction | None = None  # the turn, while it waits for its session (if_busy)
        self.response_started = False
        self.left = False  # the client went away: nothing more is sent
        self.dropped = False  # it stayed connected but stopped reading, for too long
        self.behind: deque[Message] | None = None
        self.nothing_more = False
        # How it frames an event that goes on a run of its kind (see sessions.turns.Renderer), by kind.
        self.runs: dict[type, Callable[[int, Any], Message]] = {}
        if on_disconnect == "continue":
            self.behind, self._server_send, self._queued = deque(), send, anyio.Event()
            self.send = self.write = self._queue

    async def _queue(self, message: Message) -> None:
        if self.left or self.behind is None:
            return
        self.behind.append(message)
        self._queued.set()

    def wake_writer(self, *, last: bool = False) -> None:
        """Tell :func:`_write_behind` to look again (``last``: nothing more will be queued)."""
        if self.behind is not None:
            self.nothing_more = self.nothing_more or last
            self._queued.set()

    def client_left(self) -> None:
        self.left = True
        self.wake_writer()
        if self.interaction is not None and self.on_disconnect == "cancel":
            self.interaction.cancel("disconnected")
        elif self.interaction is None and self.queued is not None:
            self.queued.cancel("disconnected")  # it never ran: whatever on_disconnect says, it is dropped

    def waiting(self, interaction: Interaction) -> None:
        self.queued = interaction

    async def started(self, interaction: Interaction) -> None:
        self.interaction = interaction
        if self.left and self.on_disconnect == "cancel":
            interaction.cancel("disconnected")

    async def keepalive(self) -> None:
        """Say something that clients ignore, to keep the connection open (for formats that can)."""

    async def event(self, seq: int, event: Event) -> int:
        raise NotImplementedError

    async def ended(self, status: str, error: AgentError | None, seq: int) -> None:
        raise NotImplementedError


_PLAIN_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tell reverse proxies (nginx) not to buffer the reply: each token should reach the client as it comes.
    (b"x-accel-buffering", b"no"),
]


class PlainText(ResponseRenderer):
    """The spec's format: one chunk per text token, and nothing else of the reply. The response starts with the
    first token, so a failure before it is a proper error status; a failure after it aborts the response (no
    terminating chunk), so a partial reply never looks whole. A stopped reply (cancel, delete, lost claim) ends as a
    whole one does: history says how."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs = {str: _chunk}

    async def _start(self) -> None:
        assert self.interaction is not None
        self.response_started = True
        headers = [*_PLAIN_HEADERS, (b"x-interaction-id", self.interaction.id.encode())]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def event(self, seq: int, event: Event) -> int:
        if type(event) is not str:
            return seq  # plain text is the text alone
        if not self.response_started:
            await self._start()
        await self.send(_chunk(seq, event))
        return seq + 1

    async def ended(self, status: str, error: AgentError | None, seq: int) -> None:
        if error is not None:
            if self.response_started:
                # Raising after the response has started makes the server abort it: no terminating chunk.
                raise StreamAborted(f"the agent failed mid-stream: {error}") from error
            raise error
        if not self.response_started:
            await self._start()
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def _chunk(seq: int, text: str) -> Message:
    return {"type": "http.response.body", "body": text.encode(), "more_body": True}


class ChatResponse:
    """The response to ``POST /api/v1/chat``: runs the turn while it watches for the client going away (a send
    only notices that on the next token, not while the agent is silent), and frames it with ``renderer``.

    Before the response starts, a turn that cannot start (busy, unknown session, store down) or an agent that
    fails before its first token is a JSON error with its status.

    The turn, the disconnect watch and the keep-alive run in one task group, owned here: when the turn ends it
    stops the other two, and when this request is torn down from outside the group cancels the turn (whose
    history writes are shielded) and waits for it. The turn runs in a task of its own rather than in this one:
    every switch to the event loop (one per token at no delay) crosses each coroutine frame between its task and
    the agent, and the server's, the middleware's and the router's are not in its way there. The disconnect
    watch, which wakes once, runs in this task: a stream holds one task fewer."""

    def __init__(
        self,
        runner: TurnRunner,
        request: TurnRequest,
        renderer: type[ResponseRenderer],
        on_disconnect: OnDisconnect,
        keepalive_seconds: float = 0.0,
        stall_seconds: float = 30.0,
    ) -> None:
        self.runner = runner
        self.request = request
        self.renderer = renderer
        self.on_disconnect = on_disconnect
        self.keepalive_seconds = keepalive_seconds
        self.stall_seconds = stall_seconds
        self.failure: Exception | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        renderer = self.renderer(send, self.on_disconnect, self.keepalive_seconds, self.stall_seconds)
        writer = None
        async with anyio.create_task_group() as task_group:
            if renderer.behind is not None:
                writer = anyio.Event()
                task_group.start_soon(_write_behind, renderer, writer)
            task_group.start_soon(self._turn, renderer, task_group.cancel_scope, writer)
            if self.keepalive_seconds > 0:
                task_group.start_soon(_keep_alive, renderer)
            await _watch_disconnect(receive, renderer)
        if renderer.dropped and not renderer.left:
            raise ClientDropped(f"the client read nothing for {self.stall_seconds:g} s of a reply that went on")
        if self.failure is not None:
            # Before the response started, the app's exception handlers answer it (parley/errors.py). After: an
            # agent failure, or the store staying down after the reply was sent; the server aborts the response,
            # which is all that is left to tell the client.
            raise self.failure

    async def _turn(self, renderer: ResponseRenderer, group: anyio.CancelScope, writer: anyio.Event | None) -> None:
        try:
            await self.runner.run(self.request, renderer)
        except Exception as exc:
            self.failure = exc  # raised by __call__, out of the task group, which would wrap it in a group
        finally:
            if writer is not None:
                renderer.wake_writer(last=True)
                await writer.wait()  # what is queued goes out first (or its client is dropped)
            if renderer.response_started and self.keepalive_seconds <= 0:
                # A server answers a receive() after the response with http.disconnect (the ASGI spec says so):
                # one pass of the event loop lets the disconnect watch end by itself, which costs a short chat
                # far less than cancelling it (make bench-instructions). Not shielded (a scope more): if the group
                # is cancelled meanwhile, this task is being torn down anyway and has nothing left to do.
                await anyio.lowlevel.checkpoint()
            if not renderer.left or self.keepalive_seconds > 0:
                group.cancel()  # the disconnect watch and the keep-alive end with the turn


async def _write_behind(renderer: ResponseRenderer, written: anyio.Event) -> None:
    """Sends what ``renderer`` queued, at its client's pace, until the last message is sent or the client is gone or
    dropped; then sets ``written``. Messages that piled up go out as one."""
    behind = renderer.behind
    assert behind is not None
    try:
        while not renderer.left:
            if not behind:
                if renderer.nothing_more:
                    return
                renderer._queued = anyio.Event()
                await renderer._queued.wait()
                continue
            message = behind.popleft()
            if message["type"] == "http.response.body" and behind:
                bodies, more = [message["body"]], message.get("more_body", False)
                while more and behind and behind[0]["type"] == "http.response.body":
                    following = behind.popleft()
                    bodies.append(following["body"])
                    more = following.get("more_body", False)
                message = {"type": "http.response.body", "body": b"".join(bodies), "more_body": more}
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            with anyio.move_on_after(renderer.stall_seconds) as stall:
                await renderer._server_send(message)
            if stall.cancelled_caught:
                stalled = renderer.stall_seconds
                logger.warning("a client read nothing for %g s of a reply that goes on: dropped", stalled)
                renderer.dropped = renderer.left = True
            if last or renderer.left:
                behind.clear()
                return
    finally:
        written.set()


async def _keep_alive(renderer: ResponseRenderer) -> None:
    seen = -1
    while True:
        await anyio.sleep(renderer.keepalive_seconds)
        tokens = len(renderer.interaction.tokens) if renderer.interaction is not None else 0
        if tokens == seen and not renderer.left:  # the agent said nothing for a while
            await renderer.keepalive()
        seen = tokens


async def _watch_disconnect(receive: Receive, renderer: ResponseRenderer) -> None:
    """Tells ``renderer`` when the client goes away. Servers answer a pending receive() once the response is complete
    (uvicorn: http.disconnect), so the watch usually ends by itself; the turn's end stops it in any case."""
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            renderer.client_left()
            return
