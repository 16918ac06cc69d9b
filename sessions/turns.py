"""The turn runner: one message answered, from the claim of its session to the record of its reply, with no wire
format in it. What it produces goes to a :class:`Renderer` (one per wire format, see :mod:`sessions.streaming`)
and to the app's turn observers (metrics, logs)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from operator import countOf
from typing import Any, Protocol

import anyio

from parley.agents import Agent, AgentError, Agents, Attachment, HistoryEntry, Turn, UpstreamError
from parley.agents.events import Event, Step, Usage
from parley.sessions.coordinator import TurnStart
from parley.sessions.errors import AgentUnavailable, ParleyError, SessionBusy, SessionNotFound
from parley.sessions.interactions import IfBusy, Interaction, Interactions
from parley.sessions.parts import EVENT_TYPES, Part, split, unfinished_calls
from parley.sessions.store import HistoryLimits, Message, MessageStatus, Session, Store, new_ordered_id, utcnow

logger = logging.getLogger("parley")

# How a cancel reason is recorded in history.
_REASON_STATUS: dict[str, MessageStatus] = {
    "cancelled": "cancelled",
    "deleted": "cancelled",
    "disconnected": "disconnected",
    "lease lost": "interrupted",
}

# Events that show nothing: a reply's first token (its time to first token) is the first event of another kind.
_UNSEEN = (Step, Usage)


@dataclass(frozen=True)
class TurnRequest:
    """What a client asked for: one message for one session."""

    session_id: str
    message: str
    file_ids: Sequence[str] = ()
    attachments: Sequence[Attachment] = ()
    owner: str = ""
    # A regenerate or an edit: the message (as the API names it) that this turn takes the place of, with all that
    # followed it (see Store.replace_turn); missing_ok: a plain turn if the session has no such message.
    replace: str | None = None
    missing_ok: bool = False
    keep: bool = False  # a regenerate: a user message ``replace`` names stays (see Store.replace_turn)
    client_id: str = ""  # the id the client gave its message (the AI SDK's), shown as its id
    if_busy: IfBusy = "reject"  # what it does when the session has a reply in progress (see Interactions.open)


@dataclass(eq=False)
class TurnReport:
    """What turn observers see of a turn (``status``, ``reason``, ``ended_at`` are set when it ends)."""

    session_id: str
    interaction_id: str
    owner: str
    agent: str
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    status: str = "streaming"
    # Why it ended: "complete", "cancelled", "disconnected", "deleted", "error", "interrupted", "lease lost".
    reason: str = ""
    error: str | None = None
    upstream: bool = False  # the error came from the agent's model server (an UpstreamError)


class TurnObserver(Protocol):
    """Told about every turn (metrics, logs). Must be cheap; whatever it raises is logged and ignored."""

    def turn_started(self, turn: TurnReport) -> None: ...
    def first_token(self, turn: TurnReport) -> None: ...
    def turn_ended(self, turn: TurnReport) -> None: ...


class Renderer(Protocol):
    """Frames a turn's events for one wire format: started, each event, ended. ``ended`` may raise: that is how a
    renderer aborts its response (plain text after a failure) or turns a failure before the first token into an
    error status.

    An event that goes on a run of its kind (text after text, reasoning after reasoning) is framed by the
    renderer's ``runs[kind]``, if it has one (plain, no await), and passed to ``write`` (the server's own send): the
    hot path pays one await per token, as a bare send does. Every other event (the first, one that follows an
    event of another kind, a kind not in ``runs``) goes to ``event``, which may start the response. ``seq``
    numbers the response's frames from 1 (a head, if the format has one, is 0): ``runs[kind](seq, event)`` is one
    frame, ``event`` frames from ``seq`` on and returns the seq after its frames, ``ended`` frames the end from
    ``seq`` on."""

    write: Callable[[Any], Awaitable[None]]

    @property
    def runs(self) -> Mapping[type, Callable[[int, Any], Any]]: ...

    def waiting(self, interaction: Interaction) -> None:
        """The turn waits for its session (if_busy): a client that leaves now drops it."""

    async def started(self, interaction: Interaction) -> None: ...
    async def event(self, seq: int, event: Event) -> int: ...
    async def ended(self, status: str, error: AgentError | None, seq: int) -> None: ...


class TurnRunner:
    """Runs turns: claim → ``start_turn`` → the agent inside the interaction's one cancel scope (with checkpoints
    of the text so far) → ``finish_turn`` (shielded) → release, then tells the renderer how it ended."""

    def __init__(
        self,
        store: Store,
        interactions: Interactions,
        agents: Agents,
        observers: Sequence[TurnObserver] = (),
        checkpoint_seconds: float = 1.0,
        record_before_end_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.interactions = interactions
        self.agents = agents
        self.observers = tuple(observers)
        self.checkpoint_seconds = checkpoint_seconds
        # Record before the client sees the end, so that reading the history right after finds the reply; but if
        # the store is slow (Redis down), end the stream after this long anyway and keep trying to record after.
        self.record_before_end_seconds = record_before_end_seconds
        self._history_limits = HistoryLimits({agent.name: agent.history_limit for agent in agents}, self._history_limit)
        # Replies whose text is due to be saved (message id → its tokens so far), and whether a write is under way:
        # see _checkpoint.
        self._due: dict[str, list[Event]] = {}
        self._saving = False
        # While run_checkpoints runs: the replies in progress (message id → its events, and how many of them the
        # last checkpoint saved), and an event it waits on while there are none.
        self._checkpointing = False
        self._live: dict[str, _Live] = {}
        self._wake: anyio.Event | None = None

    async def run(self, request: TurnRequest, renderer: Renderer) -> None:
        """Raises before ``renderer.started`` when the turn cannot start: TooManyStreams, SessionBusy (only to the
        session's owner), SessionNotFound, AgentUnavailable, StoreUnavailable."""
        opening = self.interactions.open(request.session_id, request.owner, request.if_busy, renderer.waiting)
        interaction, now, session_id, text = opening.interaction, utcnow(), request.session_id, request.message
        user = Message(
            new_ordered_id("msg_"),
            session_id,
            "user",
            text,
            request.file_ids,
            "complete",
            interaction.id,
            now,
            request.client_id,
        )
        reply = Message(new_ordered_id("msg_"), session_id, "assistant", "", (), "streaming", interaction.id, now)
        # Started with the claim, in as few round trips as the coordinator and the store allow.
        opening.turn = TurnStart(
            self.store, user, reply, self._history_limits, request.replace, request.missing_ok, request.keep
        )
        try:
            async with opening:
                assert opening.started is not None
                if opening.asked is not None:  # (a regenerate answers the user message it kept)
                    request = replace(request, message=opening.asked.content)
                await self._converse(interaction, request, renderer, reply, *opening.started)
        except SessionBusy:
            await self._when_busy(request)

    async def _when_busy(self, request: TurnRequest) -> None:
        """The busy policy: what a message to a session that is already answering one gets (its claim is taken
        by someone else). Today it is rejected: SessionBusy (409), said only to the session's owner, since to
        anyone else it is a session that does not exist. (Interrupting the reply in progress, or queueing the
        message, would be decided here.)"""
        # One store read, on this rare path only: a chat that starts pays nothing for it.
        if await self.store.get_session(request.session_id, request.owner) is None:
            raise SessionNotFound(request.session_id) from None
        raise SessionBusy(request.session_id)

    async def _converse(
        self,
        interaction: Interaction,
        request: TurnRequest,
        renderer: Renderer,
        reply: Message,
        session: Session,
        earlier: list[Message],
    ) -> None:
        session_id, interaction_id, text = request.session_id, interaction.id, request.message
        agent = self._agent(session)
        interaction.message_id = reply.id
        report = TurnReport(session_id, interaction_id, request.owner, agent.name)
        if self.observers:
            self._tell("turn_started", report)
        history = [HistoryEntry(m.role, m.content, m.parts or ()) for m in earlier]
        turn = Turn(session_id, text, history, request.attachments)
        events = interaction.tokens
        failure: Exception | None = None
        recorded = False
        # Stays "interrupted" only if something outside the interaction (a server shutdown) tears it down.
        status: MessageStatus = "interrupted"
        relayed = _Relayed()
        try:
            await renderer.started(interaction)
            async with self.interactions.coordinator.lease(interaction):
                with interaction.scope:  # its one cancel scope: a cancel, a disconnect, a delete stop the agent here
                    async with self._checkpointed(reply.id, events):
                        try:
                            async with aclosing(agent.reply(turn)) as stream:
                                await self._relay(stream, interaction, renderer, report, relayed)
                        except Exception as exc:
                            failure = exc
                        # The agent has said its last word: from here on, a cancel does not count (nor says it did).
                        interaction.agent_done = True
                interaction.agent_done = True
                self._due.pop(reply.id, None)  # (its last word is recorded below)
                # A cancel that got in first wins over what the agent did next (it may fail as it is stopped).
                if interaction.reason is not None:
                    status = _REASON_STATUS[interaction.reason]
                    failure = None
                else:
                    status = "error" if failure is not None else "complete"
                # The agent was stopped (or ended) while a tool ran: the runner records the call as failed.
                closing = unfinished_calls(events, status) if relayed.acted else []
                events.extend(closing)
                with anyio.move_on_after(self.record_before_end_seconds, shield=True) as attempt:
                    # (With Redis, the session is freed in the same round trip.)
                    content, parts, usage = split(events)
                    await self.interactions.end_turn(
                        interaction, self.store, reply.id, content, status, parts=parts, usage=usage
                    )
                recorded = not attempt.cancelled_caught
            error = self._failure(session_id, failure, report.first_token_at is not None)
            if error is not None:
                interaction.error = report.error = str(error)
                report.upstream = isinstance(error, UpstreamError)
            interaction.finish(status)  # (followers see the end)
            report.status, report.tokens, report.ended_at = status, _tokens(events, relayed.acted), time.monotonic()
            report.reason = interaction.reason or status
            if recorded:
                # Free the session before the client sees the end, so that its next message is welcome.
                await self.interactions.release(interaction)
            seq = relayed.seq
            for closed in closing:
                seq = await renderer.event(seq, closed)
            await renderer.ended(status, error, seq)
        finally:
            if not recorded:
                # The store is slow or down, or this was torn down from outside (a server shutdown): the client
                # has seen the end, or will not; keep trying to record it. Meanwhile the session stays claimed (the
                # lease renewed): nobody takes a reply whose owner may still record it for an orphan's.
                with anyio.CancelScope(shield=True):
                    if report.ended_at is None and relayed.acted:
                        events.extend(unfinished_calls(events, status))
                    async with self.interactions.coordinator.lease(interaction):
                        try:
                            await self._record(reply.id, events, status)
                        except ParleyError as exc:  # (given up after a long outage: the last checkpoint stands)
                            logger.error("could not record the reply in session %s: %s", session_id, exc)
            if report.ended_at is None:  # torn down from outside (a server shutdown)
                interaction.finish(status)
                report.status, report.tokens, report.ended_at = status, _tokens(events, relayed.acted), time.monotonic()
                report.reason = "interrupted"
            if self.observers:
                self._tell("turn_ended", report)

    async def _record(self, message_id: str, events: list[Event], status: MessageStatus) -> None:
        content, parts, usage = split(events)
        await self.store.finish_turn(message_id, content, status, parts=parts, usage=usage)

    async def run_checkpoints(self) -> None:
        """Checkpoint every reply in progress in this process, on time, until cancelled: each tick saves the replies
        whose events grew since their last checkpoint, in one store call. The app's lifespan runs it; a turn in an
        app whose lifespan does not run (mounted in a host app) runs a timer of its own instead."""
        period = max(self.checkpoint_seconds, 0.01)  # (0: as often as a timer sensibly can)
        self._checkpointing = True
        try:
            while True:
                if not self._live:  # (an idle process does not tick)
                    self._wake = anyio.Event()
                    await self._wake.wait()
                await anyio.sleep(period)
                for message_id, live in self._live.items():
                    if len(live.events) > live.saved:
                        live.saved = len(live.events)
                        self._due[message_id] = live.events
                await self._save_due()
        finally:
            self._checkpointing = False

    def _checkpointed(self, message_id: str, events: list[Event]) -> AbstractAsyncContextManager[None]:
        """The checkpoints of a reply in progress (its text, and its parts when it is not text alone) for as long
        as the ``async with`` block runs, on time rather than on events: a model that thinks, a tool that runs for a
        minute or a client that does not read leave no gap in what the history shows and what survives a crash."""
        if self._checkpointing:
            # The process's checkpoints (run_checkpoints) take it: a short chat starts no timer of its own,
            # which would cost it more than the rest of its turn (make bench-instructions).
            return _Live(self, message_id, events)
        return self._checkpointed_alone(message_id, events)

    @asynccontextmanager
    async def _checkpointed_alone(self, message_id: str, events: list[Event]) -> AsyncIterator[None]:
        """A timer of the reply's own, where the app's lifespan does not run (mounted in a host app). (The body
        catches every Exception, so the task group never has one to wrap in a group.)"""
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._checkpoint_every, message_id, events)
            yield
            task_group.cancel_scope.cancel()

    async def _checkpoint_every(self, message_id: str, events: list[Event]) -> None:
        saved = 0
        period = max(self.checkpoint_seconds, 0.01)  # (0: as often as a timer sensibly can)
        while True:
            await anyio.sleep(period)
            if len(events) > saved:
                saved = len(events)
                await self._checkpoint(message_id, events)

    async def _relay(
        self,
        stream: AsyncIterator[Any],
        interaction: Interaction,
        renderer: Renderer,
        report: TurnReport,
        relayed: _Relayed,
    ) -> None:
        """The agent's events, each to the interaction (where followers read it) and to the renderer. (Checkpoints
        run on time, beside it: see :meth:`_checkpointed`.) What the renderer has framed so far, and whether any
        event was not text, is left in ``relayed``, whatever way the agent ends."""
        # This loop is what a token costs: an event that goes on a run (text after text, say) is framed without an
        # await and written with the renderer's write, looked up once, and Interaction.add is inlined (a follower
        # waiting is rare). Any other event (the first, one of another kind than the last) goes to renderer.event,
        # which may start the response: a reply that begins with a tool call starts it there.
        write, runs, append = renderer.write, renderer.runs, interaction.tokens.append
        seq = 1
        run: Any = None  # the kind of the last event, when renderer.runs frames the next one of that kind
        frame: Any = None  # and how
        try:
            async for event in stream:
                if type(event) is run:
                    append(event)
                    if interaction.waiter is not None:
                        interaction.notify()
                    await write(frame(seq, event))
                    seq += 1
                    continue
                kind = type(event)
                if kind is not str:
                    if not isinstance(event, EVENT_TYPES):
                        raise TypeError(f"the agent yielded {kind.__name__}, not an event")
                    relayed.acted = True
                if report.first_token_at is None and not isinstance(event, _UNSEEN):
                    # The first thing the user sees.
                    report.first_token_at = time.monotonic()
                    if self.observers:
                        self._tell("first_token", report)
                interaction.add(event)
                seq = await renderer.event(seq, event)
                frame = runs.get(kind)
                run = kind if frame is not None else None
        finally:
            relayed.seq = seq

    async def _checkpoint(self, message_id: str, tokens: list[Event]) -> None:
        # The text so far, for readers of the history and for what survives a crash. Replies come due one by one;
        # the first that finds no write under way saves every reply due, in one store call, then once more those
        # that came due meanwhile; the others go on at once (1,000 streams: a few writes a second, rather than
        # 1,000 replies each waiting for its own). One that comes due during that second write is saved by the
        # next reply that comes due. A store that is slow or down must not hold the reply up: the write is given
        # up after a while, and the next one carries the text.
        self._due[message_id] = tokens
        await self._save_due()

    async def _save_due(self) -> None:
        if self._saving:
            return
        self._saving = True
        try:
            # Shielded: the write carries other replies' text too, and this reply ending must not drop theirs.
            with anyio.move_on_after(max(self.checkpoint_seconds, 0.01), shield=True):
                for _ in range(2):
                    due, self._due = self._due, {}
                    if not due:
                        break
                    try:
                        await self.store.checkpoint_turns(*_checkpoints(due))
                    except ParleyError:
                        logger.warning("could not checkpoint %d messages; will retry", len(due))
        finally:
            self._saving = False

    def _failure(self, session_id: str, failure: Exception | None, after_first_token: bool) -> AgentError | None:
        if failure is None:
            return None
        if after_first_token:
            logger.warning("agent failed mid-stream in session %s: %s", session_id, failure)
            return failure if isinstance(failure, AgentError) else AgentError("The agent failed mid-stream.")
        if isinstance(failure, AgentError):
            return failure
        logger.error("agent failed in session %s", session_id, exc_info=failure)
        return AgentError("The agent failed before it could reply.")

    def _tell(self, event: str, report: TurnReport) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(report)
            except Exception:
                logger.exception("turn observer %r failed in %s", observer, event)

    def _agent(self, session: Session) -> Agent:
        if session.agent not in self.agents:
            raise AgentUnavailable(f"This session's agent is not configured on this server: {session.agent}")
        return self.agents[session.agent]

    def _history_limit(self, session: Session) -> int:
        # Called by the store before it stores anything: an unknown agent leaves no turn behind.
        return self._agent(session).history_limit


def _checkpoints(
    due: dict[str, list[Event]],
) -> tuple[dict[str, str], dict[str, list[Part]], dict[str, dict[str, int]]]:
    """What a checkpoint saves of the replies due: their text, the parts of those that are not text alone, and the
    usage so far of those that have one."""
    contents: dict[str, str] = {}
    parts: dict[str, list[Part]] = {}
    usages: dict[str, dict[str, int]] = {}
    for message_id, events in due.items():
        contents[message_id], folded, usage = split(events)
        if folded is not None:
            parts[message_id] = folded
        if usage is not None:
            usages[message_id] = usage
    return contents, parts, usages


class _Live:
    """A reply in progress in the process's checkpoints (:meth:`TurnRunner.run_checkpoints`) while the ``async
    with`` block runs: its events, and how many of them the last checkpoint saved. (A class rather than an
    ``@asynccontextmanager``: every chat pays for it, and a generator costs more to drive.)"""

    __slots__ = ("events", "message_id", "runner", "saved")

    def __init__(self, runner: TurnRunner, message_id: str, events: list[Event]) -> None:
        self.runner = runner
        self.message_id = message_id
        self.events = events
        self.saved = 0

    async def __aenter__(self) -> None:
        runner = self.runner
        runner._live[self.message_id] = self
        if runner._wake is not None:
            runner._wake.set()
            runner._wake = None

    async def __aexit__(self, *exc_info: object) -> None:
        del self.runner._live[self.message_id]


@dataclass
class _Relayed:
    """What :meth:`TurnRunner._relay` leaves for the end of the turn: the seq of the renderer's next frame, and
    whether an event was not text (then the reply may have tool calls to close, and its text tokens are counted)."""

    seq: int = 1
    acted: bool = False


def _tokens(events: list[Event], acted: bool) -> int:
    """How many text tokens a reply streamed (what observers count): all its events, unless some were not text."""
    return countOf(map(type, events), str) if acted else len(events)  # (counted in C: a reply may be long)
