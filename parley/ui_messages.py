"""Server-sent events in the AI SDK's UI message stream protocol (v1), what ``useChat`` reads.

Every frame has ``id: <interaction_id>:<seq>`` and one JSON part, in an order that follows from the interaction
alone: ``start`` (seq 0), then the chunks that frame each of the reply's events in turn (:mod:`parley.agents.events`,
kept in ``interaction.tokens``), then the tail: the open part's end, ``finish-step`` if a step is open, after a
failure ``message-metadata`` (the status) and ``error``, and ``finish`` (the status and the usage); then
``data: [DONE]``. So a reply can be replayed for a client that rejoins, from its start or from any
``Last-Event-ID``, frame for frame as it was first sent. A text reply is ``start``, ``text-start``, one
``text-delta`` per token, ``text-end``, ``finish``.

Parts open and close by the rule :mod:`parley.sessions.parts` folds history by: a run of text is one text part
(every text part has the id ``text``: the SDK forgets a part's id at its end), a run of reasoning one reasoning
part, and any other event ends the run.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

from starlette.types import Message

from parley.agents import AgentError
from parley.agents.events import (
    Event,
    Reasoning,
    Step,
    ToolCall,
    ToolError,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    Usage,
)
from parley.sessions.interactions import Interaction
from parley.sessions.parts import reasoning_id
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


# json.dumps with these arguments, made once rather than on every frame.
_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _frame(interaction_id: str, seq: int | None, part: dict[str, Any]) -> bytes:
    data = _json(part)
    if seq is None:
        return f"data: {data}\n\n".encode()
    return f"id: {interaction_id}:{seq}\ndata: {data}\n\n".encode()


def head(interaction: Interaction) -> bytes:
    """Frame 0: ``start``. Its metadata is the reply's as history gives it while it runs (``status`` streaming):
    ``useChat`` keeps it as the message's until ``finish`` merges in how it ended."""
    metadata = {"ui_session_id": interaction.session_id, "interaction_id": interaction.id, "status": "streaming"}
    start = {"type": "start", "messageId": interaction.message_id, "messageMetadata": metadata}
    return _frame(interaction.id, 0, start)


# A text-delta frame, as _frame would build it, around its delta: there is one per token, and building the
# part's JSON with json.dumps costs several times what the rest of a token does. encode_basestring_ascii is the
# escape json.dumps applies to every string (json.dumps(text) is that call, after its keyword checks).
_DELTA_DATA = f'\ndata: {{"type":"text-delta","id":"{_TEXT_ID}","delta":'


def _delta(interaction_id: str, seq: int, text: str) -> bytes:
    return f"id: {interaction_id}:{seq}{_DELTA_DATA}{encode_basestring_ascii(text)}}}\n\n".encode()


def _reasoning_delta(interaction_id: str, seq: int, part_id: str, text: str) -> bytes:
    # The same for a reasoning-delta, as many as a reasoning model streams (``part_id`` is reasoning_id's: no escape).
    data = f'{{"type":"reasoning-delta","id":"{part_id}","delta":{encode_basestring_ascii(text)}}}'
    return f"id: {interaction_id}:{seq}\ndata: {data}\n\n".encode()


def delta(interaction_id: str, token: int, text: str) -> bytes:
    """The frame of token number ``token`` (from 0) of a reply of text alone (after ``start`` and ``text-start``)."""
    return _delta(interaction_id, token + 2, text)


class Framer:
    """Frames a reply's events one by one, in order, numbering the frames from a seq its caller keeps; knows which
    part is open, whether a step is, which tool calls the client has heard of, and the usage so far."""

    __slots__ = ("calls", "open", "reasoning", "reasonings", "step", "usage")

    def __init__(self) -> None:
        self.open = ""  # "text", "reasoning", or "" (no part open)
        self.reasonings = 0
        self.reasoning = ""  # the id of the last reasoning part opened
        self.step = False
        self.calls: set[str] = set()
        self.usage: Usage | None = None

    def frames(self, interaction_id: str, seq: int, event: Event) -> list[bytes]:
        """The frames of ``event``, numbered from ``seq`` (as many as there are frames: maybe none)."""
        if type(event) is str:
            if self.open == "text":
                return [_delta(interaction_id, seq, event)]
            chunks = self._close()
            chunks.append({"type": "text-start", "id": _TEXT_ID})
            self.open = "text"
            frames = [_frame(interaction_id, seq + index, chunk) for index, chunk in enumerate(chunks)]
            frames.append(_delta(interaction_id, seq + len(chunks), event))
            return frames
        if type(event) is Reasoning and self.open == "reasoning":
            return [_reasoning_delta(interaction_id, seq, self.reasoning, event.text)]
        return [_frame(interaction_id, seq + index, chunk) for index, chunk in enumerate(self._chunks(event))]

    def _chunks(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, Reasoning):
            chunks = []
            if self.open != "reasoning":
                chunks = self._close()
                self.reasoning = reasoning_id(self.reasonings)
                chunks.append({"type": "reasoning-start", "id": self.reasoning})
                self.reasonings += 1
                self.open = "reasoning"
            chunks.append({"type": "reasoning-delta", "id": self.reasoning, "delta": event.text})
            return chunks
        if isinstance(event, Usage):
            self.usage = event if self.usage is None else self.usage + event
            return []
        chunks = self._close()
        if isinstance(event, Step):
            if self.step:
                chunks.append({"type": "finish-step"})
            chunks.append({"type": "start-step"})
            self.step = True
        elif isinstance(event, ToolInputStart):
            self.calls.add(event.call_id)
            chunks.append({"type": "tool-input-start", "toolCallId": event.call_id, "toolName": event.name})
            chunks[-1]["dynamic"] = True
        elif isinstance(event, ToolInputDelta):
            if event.call_id in self.calls:  # (a delta before its start would make the client throw)
                chunks.append({"type": "tool-input-delta", "toolCallId": event.call_id, "inputTextDelta": event.delta})
        elif isinstance(event, ToolCall):
            self.calls.add(event.call_id)
            available = {"type": "tool-input-available", "toolCallId": event.call_id, "toolName": event.name}
            chunks.append({**available, "input": event.input, "dynamic": True})
        elif isinstance(event, ToolResult):
            if event.call_id in self.calls:
                chunks.append({"type": "tool-output-available", "toolCallId": event.call_id, "output": event.output})
                chunks[-1]["dynamic"] = True
        elif isinstance(event, ToolError) and event.call_id in self.calls:
            chunks.append({"type": "tool-output-error", "toolCallId": event.call_id, "errorText": event.error})
            chunks[-1]["dynamic"] = True
        return chunks

    def _close(self) -> list[dict[str, Any]]:
        if self.open == "text":
            chunks = [{"type": "text-end", "id": _TEXT_ID}]
        elif self.open == "reasoning":
            chunks = [{"type": "reasoning-end", "id": self.reasoning}]
        else:
            return []
        self.open = ""
        return chunks

    def tail(self, interaction: Interaction, seq: int) -> list[bytes]:
        """The frames after the reply's last event (it has ended), numbered from ``seq``."""
        chunks = self._close()
        if self.step:
            chunks.append({"type": "finish-step"})
            self.step = False
        if interaction.error is not None:
            # The AI SDK stops reading at an error part (its finish is never applied): the status goes first.
            chunks.append({"type": "message-metadata", "messageMetadata": {"status": interaction.status}})
            chunks.append({"type": "error", "errorText": interaction.error})
        metadata: dict[str, Any] = {"status": interaction.status}
        if self.usage is not None:
            metadata["usage"] = self.usage.to_json()
        finish = {"type": "finish", "finishReason": FINISH_REASONS.get(interaction.status, "other")}
        chunks.append({**finish, "messageMetadata": metadata})
        return [_frame(interaction.id, seq + index, chunk) for index, chunk in enumerate(chunks)]


class Replay:
    """The frames of an interaction so far, for a client that rejoins: those after ``after`` (a Last-Event-ID's
    seq; -1 for all) on the first call, then on each call those that came since (and ``[DONE]`` at the end). They
    are numbered as the reply's own response numbered them: frame for frame the same."""

    def __init__(self, interaction: Interaction, after: int = -1) -> None:
        self.interaction = interaction
        self.after = after
        self.framer = Framer()
        self.framed = 0  # events framed so far
        self.seq = 1  # the next frame's (0 is the head)
        self.headed = after >= 0

    def more(self) -> tuple[bytes, bool]:
        """The new frames, and whether the reply has ended (they are then its last)."""
        interaction, after, framer, seq = self.interaction, self.after, self.framer, self.seq
        ended = bool(interaction.status)  # (read first: every event is in before the status is set)
        events = interaction.tokens
        out = [] if self.headed else [head(interaction)]
        self.headed = True
        count = len(events)
        for index in range(self.framed, count):
            frames = framer.frames(interaction.id, seq, events[index])
            out.extend(frames[max(after + 1 - seq, 0) :])
            seq += len(frames)
        self.framed, self.seq = count, seq
        if ended:
            out.extend(framer.tail(interaction, seq)[max(after + 1 - seq, 0) :])
            out.append(DONE)
        return b"".join(out), ended


class ServerSentEvents(ResponseRenderer):
    """The AI SDK's UI message stream. Like plain text, the response starts with the first event (or the first
    keep-alive), so a failure before it is still a JSON error with its status; a failure after it is told in an
    ``error`` part, and the stream ends cleanly."""

    closed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.framer = Framer()
        self.pending = b""  # frames of a step's start, held until something the user sees starts the response
        self.runs = {str: self._text_delta, Reasoning: self._reasoning_delta}

    async def _start(self) -> None:
        assert self.interaction is not None
        self.response_started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": headers(self.interaction.id)})
        await self._body(head(self.interaction) + self.pending)
        self.pending = b""

    async def _body(self, body: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def event(self, seq: int, event: Event) -> int:
        assert self.interaction is not None
        frames = self.framer.frames(self.interaction.id, seq, event)
        if not self.response_started:  # (a keep-alive may have started it)
            if isinstance(event, (Step, Usage)):
                # Not yet: a model call that fails before it says anything is still answered with its status.
                self.pending += b"".join(frames)
                return seq + len(frames)
            await self._start()
        if frames:
            await self._body(b"".join(frames))
        return seq + len(frames)

    def _text_delta(self, seq: int, text: str) -> Message:
        assert self.interaction is not None
        return {"type": "http.response.body", "body": _delta(self.interaction.id, seq, text), "more_body": True}

    def _reasoning_delta(self, seq: int, reasoning: Reasoning) -> Message:
        # (in the reasoning part that the framer opened for the run's first event)
        assert self.interaction is not None
        body = _reasoning_delta(self.interaction.id, seq, self.framer.reasoning, reasoning.text)
        return {"type": "http.response.body", "body": body, "more_body": True}

    async def keepalive(self) -> None:
        if self.closed or self.interaction is None:
            return
        if not self.response_started:
            await self._start()
        await self._body(KEEPALIVE)

    async def ended(self, status: str, error: AgentError | None, seq: int) -> None:
        if error is not None and not self.response_started:
            raise error
        if not self.response_started:
            await self._start()
        assert self.interaction is not None
        self.closed = True
        await self._body(b"".join(self.framer.tail(self.interaction, seq)) + DONE, more=False)
