from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from agents import Agent, AgentError, Agents, Attachment, HistoryEntry, Turn
from sessions.errors import AgentUnavailable, ApiError
from sessions.interactions import Interaction, Interactions
from sessions.store import Message, MessageStatus, Session, Store, new_ordered_id, utcnow

logger = logging.getLogger("parley")

_REASON_STATUS: dict[str, MessageStatus] = {
    "cancelled": "cancelled",
    "deleted": "cancelled",
    "disconnected": "disconnected",
}


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message}, status_code=status_code)


class ChatStream:
    """The response to ``POST /api/v1/chat``: one interaction, streamed as plain text, one chunk per token.

    It claims the session, stores the user's message (learning the session's agent: one store round trip
    does both, and says 404 for a session that does not exist), then runs two tasks in one task group: the agent's
    tokens, driven inside the interaction's cancel scope and sent as they come, and a watcher that turns
    the client's disconnect into a cancel of that scope. Whatever ends the interaction (done, cancel,
    disconnect, agent error), the assistant's turn is recorded under a shield.

    The response starts with the agent's first token, so a failure before it is a proper error status;
    a failure after it aborts the response (no terminating chunk), so a partial reply never looks whole.
    """

    def __init__(
        self,
        *,
        store: Store,
        interactions: Interactions,
        agents: Agents,
        session_id: str,
        owner: str,
        message: str,
        file_ids: Sequence[str] = (),
        attachments: Sequence[Attachment] = (),
    ) -> None:
        self.store = store
        self.interactions = interactions
        self.agents = agents
        self.session_id = session_id
        self.owner = owner
        self.message = message
        self.file_ids = tuple(file_ids)
        self.attachments = tuple(attachments)
        self.response_started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.interactions.open(self.session_id) as interaction:
                await self._converse(interaction, receive, send)
        except (ApiError, AgentError) as exc:
            if self.response_started:
                raise  # the store stayed down after the reply was sent: nothing is left to tell the client
            # Before the response starts: a busy session, a store that is down, an agent that failed before
            # its first token. After the first token, failures abort the stream instead.
            await error_response(exc.status_code, str(exc))(scope, receive, send)

    async def _converse(self, interaction: Interaction, receive: Receive, send: Send) -> None:
        now, session_id, interaction_id = utcnow(), self.session_id, interaction.id
        user = Message(
            new_ordered_id("msg_"), session_id, "user", self.message, self.file_ids, "complete", interaction_id, now
        )
        reply = Message(new_ordered_id("msg_"), session_id, "assistant", "", (), "streaming", interaction_id, now)
        session, earlier = await self.store.start_turn(user, reply, self._history_limit, owner=self.owner)
        agent = self._agent(session)
        history = [HistoryEntry(m.role, m.content) for m in earlier]

        turn = Turn(self.session_id, self.message, history, self.attachments)
        headers = [*_HEADERS, (b"x-interaction-id", interaction.id.encode())]
        sent: list[str] = []
        recorded = False
        failure: Exception | None = None
        # Stays "interrupted" only if something outside the interaction (a server shutdown) tears it down.
        status: MessageStatus = "interrupted"
        try:
            async with anyio.create_task_group() as task_group:
                watcher = task_group.start_soon(_cancel_on_disconnect, receive, interaction)
                renewer = None
                if self.interactions.coordinator is not None:
                    renewer = task_group.start_soon(self.interactions.keep_claimed, interaction)
                with interaction.scope:
                    try:
                        async with aclosing(agent.reply(turn)) as tokens:
                            async for token in tokens:
                                if not self.response_started:
                                    self.response_started = True
                                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                                await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
                                sent.append(token)
                    except Exception as exc:
                        failure = exc
                # From here on, a disconnect is only the server noticing that the response is over.
                interaction.finished = True
                if failure is not None:
                    status = "error"
                elif interaction.scope.cancelled_caught and interaction.reason is not None:
                    status = _REASON_STATUS[interaction.reason]
                else:
                    status = "complete"
                # Record before the client sees the end, so that reading the history right after finds the
                # reply; but if the store is slow (Redis down), end the stream anyway and keep trying below.
                with anyio.move_on_after(_RECORD_BEFORE_END, shield=True) as attempt:
                    await self.store.finish_turn(reply.id, "".join(sent), status)
                recorded = not attempt.cancelled_caught
                if renewer is not None:
                    renewer.cancel()
                    await renewer.wait()  # before the release: a renewal after it would claim the session again
                if recorded:
                    # Free the session before the client sees the end, so that its next message is welcome.
                    await self.interactions.release(interaction)
                if failure is None:
                    if not self.response_started:
                        self.response_started = True
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    # Servers answer a pending receive() once the response is complete (uvicorn: http.disconnect),
                    # so the watcher usually ends by itself: give it that turn before stopping it. (Letting a
                    # task return costs less than cancelling it: anyio formats the canceller's repr.)
                    await anyio.lowlevel.checkpoint()
                watcher.cancel()
        finally:
            if not recorded:
                with anyio.CancelScope(shield=True):
                    await self.store.finish_turn(reply.id, "".join(sent), status)

        if failure is not None:
            if self.response_started:
                logger.warning("agent failed mid-stream in session %s: %s", self.session_id, failure)
                # Raising after the response has started makes the server abort it: no terminating chunk.
                raise StreamAborted(f"the agent failed mid-stream: {failure}") from failure
            if isinstance(failure, AgentError):
                raise failure
            logger.error("agent failed in session %s", self.session_id, exc_info=failure)
            raise AgentError("The agent failed before it could reply.")

    def _agent(self, session: Session) -> Agent:
        if session.agent not in self.agents:
            raise AgentUnavailable(f"This session's agent is not configured on this server: {session.agent}")
        return self.agents[session.agent]

    def _history_limit(self, session: Session) -> int:
        # Called by the store before it stores anything: an unknown agent leaves no turn behind.
        return self._agent(session).history_limit


_RECORD_BEFORE_END = 1.0


class StreamAborted(Exception):
    """Raised to the server to abort a chat response whose agent failed after the first token."""


_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tell reverse proxies (nginx) not to buffer the reply: each token should reach the client as it comes.
    (b"x-accel-buffering", b"no"),
]


async def _cancel_on_disconnect(receive: Receive, interaction: Interaction) -> None:
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            interaction.cancel("disconnected")
            return
