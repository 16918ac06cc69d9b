"""Server-sent events in the AI SDK's UI message stream protocol (v1), what ``useChat`` reads.

Every frame has ``id: <interaction_id>:<seq>`` and one JSON part, in an order that follows from the interaction
alone: ``start`` (seq 0), ``text-start`` (1), one ``text-delta`` per token (2 ...), ``text-end``, after a failure
``message-metadata`` (the status) and ``error``, then ``finish``; then ``data: [DONE]``. So a reply can be
replayed for a client that rejoins, from its start or from any ``Last-Event-ID``, frame for frame as it was
first sent.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

from starlette.types import Message

from parley.agents import AgentError
from parley.sessions.interactions import Interaction
from parley.streaming import ResponseRenderer

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-vercel-ai-ui-message-stream", b"v1"),
]
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

# History status → the protocol's finishReason: one that the AI SDK 6 and 7 both accept (stop, length,
# content-filter, tool-calls, error, other; 7 adds "interrupted", which 6 rejects as an invalid stream, and npm
# installs 6 on Node 20). A stopped reply is "other": how it was stopped rides in messageMetadata.status.
FINISH_REASONS = {
    "complete": "stop",
    "error": "error",
    "cancelled": "other",
    "disconnected": "other",
    "interrupted": "other",
}
_TEXT_ID = "text"


def headers(interaction_id: str) -> list[tuple[bytes, bytes]]:
    return [*SSE_HEADERS, (b"x-interaction-id", interaction_id.encode())]


def _frame(interaction_id: str, seq: int, part: dict[str, Any]) -> bytes:
    return f"id: {interaction_id}:{seq}\ndata: {json.dumps(part, separators=(',', ':'))}\n\n".encode()


def _head(interaction: Interaction) -> list[bytes]:
    """Frames 0 and 1: ``start`` and ``text-start``."""
    start = {
        "type": "start",
        "messageId": interaction.message_id,
        "messageMetadata": {"ui_session_id": interaction.session_id, "interaction_id": interaction.id},
    }
    return [_frame(interaction.id, 0, start), _frame(interaction.id, 1, {"type": "text-start", "id": _TEXT_ID})]


def head(interaction: Interaction) -> bytes:
    return b"".join(_head(interaction))


# A text-delta frame, as _frame would build it, around its delta: there is one per token, and building the
# part's JSON with json.dumps costs several times what the rest of a token does. encode_basestring_ascii is the
# escape json.dumps applies to every string (json.dumps(text) is that call, after its keyword checks).
_DELTA_DATA = f'\ndata: {{"type":"text-delta","id":"{_TEXT_ID}","delta":'


def delta(interaction_id: str, seq: int, text: str) -> bytes:
    """The frame of token ``seq`` (counted from 0)."""
    return f"id: {interaction_id}:{seq + 2}{_DELTA_DATA}{encode_basestring_ascii(text)}}}\n\n".encode()


def _tail(interaction: Interaction) -> list[tuple[int, bytes]]:
    seq = len(interaction.tokens) + 2
    frames = [(seq, _frame(interaction.id, seq, {"type": "text-end", "id": _TEXT_ID}))]
    if interaction.error is not None:
        # The AI SDK stops reading at an error part (its finish is never applied): the status goes first.
        status = {"type": "message-metadata", "messageMetadata": {"status": interaction.status}}
        frames.append((seq + 1, _frame(interaction.id, seq + 1, status)))
        seq += 2
        frames.append((seq, _frame(interaction.id, seq, {"type": "error", "errorText": interaction.error})))
    finish = {
        "type": "finish",
        "finishReason": FINISH_REASONS.get(interaction.status, "other"),
        "messageMetadata": {"status": interaction.status},
    }
    frames.append((seq + 1, _frame(interaction.id, seq + 1, finish)))
    return frames


def tail(interaction: Interaction) -> bytes:
    """The frames after the last token (the interaction has ended), and ``[DONE]``."""
    return b"".join(frame for _, frame in _tail(interaction)) + DONE


def replay(interaction: Interaction, after: int = -1) -> tuple[bytes, int]:
    """The frames of the interaction so far whose seq is after ``after`` (then ``[DONE]`` if it has ended), and
    the seq of the last of them: a follower calls it again with that, as the interaction goes on."""
    tokens = interaction.tokens
    count = len(tokens)
    frames = [frame for seq, frame in enumerate(_head(interaction)) if seq > after]
    frames.extend(delta(interaction.id, index, tokens[index]) for index in range(max(after - 1, 0), count))
    last = max(after, count + 1)
    if interaction.status:
        for seq, frame in _tail(interaction):
            if seq > after:
                frames.append(frame)
                last = seq
        frames.append(DONE)
    return b"".join(frames), last


class ServerSentEvents(ResponseRenderer):
    """The AI SDK's UI message stream. Like plain text, the response starts with the first token (or the first
    keep-alive), so a failure before it is still a JSON error with its status; a failure after it is told in an
    ``error`` part, and the stream ends cleanly."""

    closed = False

    async def _start(self) -> None:
        assert self.interaction is not None
        self.response_started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": headers(self.interaction.id)})
        await self._body(head(self.interaction))

    async def _body(self, body: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def first_token(self, text: str) -> None:
        if not self.response_started:  # (a keep-alive may have started it)
            await self._start()
        await self.send(self.frame(0, text))

    def frame(self, seq: int, text: str) -> Message:
        assert self.interaction is not None
        return {"type": "http.response.body", "body": delta(self.interaction.id, seq, text), "more_body": True}

    async def keepalive(self) -> None:
        if self.closed or self.interaction is None:
            return
        if not self.response_started:
            await self._start()
        await self._body(KEEPALIVE)

    async def ended(self, status: str, error: AgentError | None) -> None:
        if error is not None and not self.response_started:
            raise error
        if not self.response_started:
            await self._start()
        assert self.interaction is not None
        self.closed = True
        await self._body(tail(self.interaction), more=False)
