"""The turn runner: one message answered, from the claim of its session to the record of its reply, with no wire
format in it. What it produces goes to a :class:`Renderer` (one per wire format, see :mod:`sessions.streaming`)
and to the app's turn observers (metrics, logs)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from parley.agents import Agent, AgentError, Agents, Attachment, HistoryEntry, Turn, UpstreamError
from parley.sessions.errors import AgentUnavailable, ParleyError, SessionBusy, SessionNotFound
from parley.sessions.interactions import IfBusy, Interaction, Interactions, TurnStart
from parley.sessions.store import HistoryLimits, Message, MessageStatus, Session, Store, new_ordered_id, utcnow

logger = logging.getLogger("parley")

# How a cancel reason is recorded in history.
_REASON_STATUS: dict[str, MessageStatus] = {
    "cancelled": "cancelled",
    "deleted": "cancelled",
    "disconnected": "disconnected",
    "lease lost": "interrupted",
}

# Record before the client sees the end, so that reading the history right after finds the reply; but if the
# store is slow (Redis down), end the stream after this long anyway and keep trying to record in the background.
_RECORD_BEFORE_END = 1.0


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
    """Frames a turn's events for one wire format: started, each token (seq from 0), ended. ``ended`` may raise:
    that is how a renderer aborts its response (plain text after a failure) or turns a failure before the first
    token into an error status.

    A token after the first is framed by ``frame`` (plain, no await) and passed to ``write`` (the server's own
    send): the hot path pays one await per token, as a bare send does. The first token may start the response."""

    write: Callable[[Any], Awaitable[None]]

    def waiting(self, interaction: Interaction) -> None:
        """The turn waits for its session (if_busy): a client that leaves now drops it."""

    async def started(self, interaction: Interaction) -> None: ...
    async def first_token(self, text: str) -> None: ...
    def frame(self, seq: int, text: str) -> Any: ...
    async def ended(self, status: str, error: AgentError | None) -> None: ...


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
    ) -> None:
        self.store = store
        self.interactions = interactions
        self.agents = agents
        self.observers = tuple(observers)
        self.checkpoint_seconds = checkpoint_seconds
        self._history_limits = HistoryLimits({agent.name: agent.history_limit for agent in agents}, self._history_limit)
        # Replies whose text is due to be saved (message id → its tokens so far), and whether a write is under way:
        # see _checkpoint.
        self._due: dict[str, list[str]] = {}
        self._saving = False

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
        turn = Turn(session_id, text, [HistoryEntry(m.role, m.content) for m in earlier], request.attachments)
        tokens = interaction.tokens
        failure: Exception | None = None
        recorded = False
        # Stays "interrupted" only if something outside the interaction (a server shutdown) tears it down.
        status: MessageStatus = "interrupted"
        try:
            await renderer.started(interaction)
            async with self.interactions.coordinator.lease(interaction):
                async with self._checkpointed(interaction, reply.id, tokens):
                    try:
                        async with aclosing(agent.reply(turn)) as stream:
                            await self._relay(stream, interaction, renderer, report, reply.id)
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
                with anyio.move_on_after(_RECORD_BEFORE_END, shield=True) as attempt:
                    # (With Redis, the session is freed in the same round trip.)
                    await self.interactions.end_turn(interaction, self.store, reply.id, "".join(tokens), status)
                recorded = not attempt.cancelled_caught
            error = self._failure(session_id, failure, bool(tokens))
            if error is not None:
                interaction.error = report.error = str(error)
                report.upstream = isinstance(error, UpstreamError)
            interaction.finish(status)  # (followers see the end)
            report.status, report.tokens, report.ended_at = status, len(tokens), time.monotonic()
            report.reason = interaction.reason or status
            if recorded:
                # Free the session before the client sees the end, so that its next message is welcome.
                await self.interactions.release(interaction)
            await renderer.ended(status, error)
        finally:
            if not recorded:
                # The store is slow or down: the client has seen the end; keep trying to record it.
                with anyio.CancelScope(shield=True):
                    await self.store.finish_turn(reply.id, "".join(tokens), status)
            if report.ended_at is None:  # torn down from outside (a server shutdown)
                interaction.finish(status)
                report.status, report.tokens, report.ended_at = status, len(tokens), time.monotonic()
                report.reason = "interrupted"
            if self.observers:
                self._tell("turn_ended", report)

    @asynccontextmanager
    async def _checkpointed(self, interaction: Interaction, message_id: str, tokens: list[str]) -> AsyncIterator[None]:
        """The interaction's cancel scope, and in it the checkpoints of its text so far, on time rather than on
        tokens: a model that thinks, a tool that runs for a minute or a client that does not read leave no gap in
        what the history shows and what survives a crash. (The body catches every Exception, so the task group
        never has one to wrap in a group.)"""
        with interaction.scope:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._checkpoint_every, message_id, tokens)
                yield
                task_group.cancel_scope.cancel()

    async def _checkpoint_every(self, message_id: str, tokens: list[str]) -> None:
        saved = 0
        period = max(self.checkpoint_seconds, 0.01)  # (0: as often as a timer sensibly can)
        while True:
            await anyio.sleep(period)
            if len(tokens) > saved:
                saved = len(tokens)
                await self._checkpoint(message_id, tokens)

    async def _relay(
        self,
        stream: AsyncIterator[Any],
        interaction: Interaction,
        renderer: Renderer,
        report: TurnReport,
        message_id: str,
    ) -> None:
        """The agent's tokens, each to the interaction (where followers read it) and to the renderer. (Checkpoints
        run on time, beside it: see :meth:`_checkpointed`. What else an agent yields, see agents/events.py, is
        passed over until the runner keeps it as the reply's parts.)"""
        async for first in stream:
            if isinstance(first, str):
                break
        else:
            return
        report.first_token_at = time.monotonic()
        if self.observers:
            self._tell("first_token", report)
        interaction.add(first)
        await renderer.first_token(first)
        # Every other token. This loop is what a token costs: the renderer's write and frame are looked up once,
        # the frame is built without an await, and Interaction.add is inlined (a follower waiting is rare).
        tokens, write, frame = interaction.tokens, renderer.write, renderer.frame
        seq = 1
        async for token in stream:
            if not isinstance(token, str):
                continue
            tokens.append(token)
            if interaction.waiter is not None:
                interaction.notify()
            await write(frame(seq, token))
            seq += 1

    async def _checkpoint(self, message_id: str, tokens: list[str]) -> None:
        # The text so far, for readers of the history and for what survives a crash. Replies come due one by one;
        # the first that finds no write under way saves every reply due, in one store call, then once more those
        # that came due meanwhile; the others go on at once (1,000 streams: a few writes a second, rather than
        # 1,000 replies each waiting for its own). One that comes due during that second write is saved by the
        # next reply that comes due. A store that is slow or down must not hold the reply up: the write is given
        # up after a while, and the next one carries the text.
        self._due[message_id] = tokens
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
                        await self.store.checkpoint_turns({saved: "".join(text) for saved, text in due.items()})
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
