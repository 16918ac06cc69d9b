"""A reply's parts: the events an agent yields (:mod:`parley.agents.events`) folded into the AI SDK's UIMessage
parts, the shapes ``useChat`` keeps for a finished reply, so that a client restores a conversation from history as
it saw it stream:

- ``{"type": "step-start"}``
- ``{"type": "reasoning", "id", "text", "state": "done"}``
- ``{"type": "dynamic-tool", "toolName", "toolCallId", "state", "input", "output"?, "errorText"?}``, ``state``
  one of ``input-streaming``, ``input-available``, ``output-available``, ``output-error``
- ``{"type": "text", "text", "state": "done"}``

A run of text is one text part and a run of reasoning one reasoning part; any other event (a step, a tool call, its
outcome) ends the run, and a :class:`Usage` is no part at all (it is summed into the reply's usage). The SSE renderer
(:mod:`parley.ui_messages`) opens and closes its parts by the same rule, so what a client builds from the stream and
what history keeps agree. A reply made of text alone is kept as its text (``parts`` None): its one text part is
implied, which keeps the text path as cheap as it was and reads every message stored before parts existed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from itertools import groupby
from operator import attrgetter
from typing import Any

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

Part = dict[str, Any]

# Everything an agent may yield, for the turn runner's check of what it is given.
EVENT_TYPES = (str, Reasoning, Step, ToolInputStart, ToolInputDelta, ToolCall, ToolResult, ToolError, Usage)

_STATUS_WORDS = {
    "cancelled": "the reply was cancelled",
    "disconnected": "the client went away",
    "interrupted": "the reply was interrupted",
    "error": "the agent failed",
    "complete": "the agent ended without its result",
}


def text_parts(role: str, content: str) -> list[Part]:
    """The parts of a message kept as its text alone: a user's message (as ``useChat`` sends it), or a reply of
    text only (as ``useChat`` keeps it)."""
    if role == "user":
        return [{"type": "text", "text": content}]
    return [{"type": "text", "text": content, "state": "done"}] if content else []


def reasoning_id(index: int) -> str:
    """The id of a reply's ``index``-th reasoning part, in history and on the wire (``useChat`` keeps it)."""
    return f"reasoning-{index}"


def fold(events: Sequence[Event]) -> list[Part]:
    """The parts of a reply made of ``events`` (its state so far, if it is still streaming)."""
    return _fold(events)[0]


def _fold(events: Sequence[Event]) -> tuple[list[Part], str, Usage | None]:
    """The parts of a reply, its text (its text parts joined) and its usage (None when it reported none)."""
    parts: list[Part] = []
    run: list[str] = []  # the pieces of the text or reasoning part at the end of ``parts``
    running = ""  # what that part is ("text", "reasoning"), or "" when the last part is of another kind
    texts: list[str] = []  # the text parts' text
    calls: dict[str, Part] = {}
    raw: dict[str, str] = {}  # the input text of calls still streaming it
    reasonings = 0
    usage: Usage | None = None

    def close() -> None:
        nonlocal running
        if running:
            parts[-1]["text"] = "".join(run)
            if running == "text":
                texts.append(parts[-1]["text"])
            run.clear()
            running = ""

    # Event by event, but a run of one kind at once: a reply is mostly runs of text and reasoning, whose tokens
    # are then taken in C (groupby, extend, map) rather than one by one in Python.
    for kind, same in groupby(events, type):
        if kind is str:
            if running != "text":
                close()
                parts.append({"type": "text", "text": "", "state": "done"})
                running = "text"
            run.extend(same)  # type: ignore[arg-type]
        elif kind is Reasoning:
            if running != "reasoning":
                close()
                parts.append({"type": "reasoning", "id": reasoning_id(reasonings), "text": "", "state": "done"})
                reasonings += 1
                running = "reasoning"
            run.extend(map(_text_of, same))
        elif kind is Usage:  # (no part, and it ends no run)
            for event in same:
                usage = event if usage is None else usage + event  # type: ignore[operator,assignment]
        else:
            close()
            for event in same:
                _fold_call(event, parts, calls, raw)
    close()
    return parts, "".join(texts), usage


_text_of = attrgetter("text")


def _fold_call(event: Event, parts: list[Part], calls: dict[str, Part], raw: dict[str, str]) -> None:
    """Folds a step or an event of a tool call into ``parts``."""
    if isinstance(event, Step):
        parts.append({"type": "step-start"})
    elif isinstance(event, ToolInputStart):
        part = {"type": "dynamic-tool", "toolName": event.name, "toolCallId": event.call_id}
        part["state"] = "input-streaming"
        calls[event.call_id] = part
        raw[event.call_id] = ""
        parts.append(part)
    elif isinstance(event, ToolInputDelta):
        if event.call_id in raw:
            raw[event.call_id] += event.delta
            partial = _partial_json(raw[event.call_id])
            if partial is not None:
                calls[event.call_id]["input"] = partial
    elif isinstance(event, ToolCall):
        raw.pop(event.call_id, None)
        part = calls.get(event.call_id) or {}
        if not part:
            calls[event.call_id] = part
            parts.append(part)
        part.update(type="dynamic-tool", toolName=event.name, toolCallId=event.call_id)
        part.update(state="input-available", input=event.input)
    elif isinstance(event, ToolResult):
        if event.call_id in calls:
            calls[event.call_id].update(state="output-available", output=event.output)
    elif isinstance(event, ToolError) and event.call_id in calls:
        calls[event.call_id].update(state="output-error", errorText=event.error)


def split(events: Sequence[Event]) -> tuple[str, list[Part] | None, dict[str, int] | None]:
    """What history keeps of a reply: its text (the text parts joined), its parts (None for text alone: see the
    module's docstring) and its usage (None when there is none)."""
    try:
        return "".join(events), None, None  # type: ignore[arg-type]
    except TypeError:  # (not text alone)
        pass
    parts, content, usage = _fold(events)
    return content, parts, usage.to_json() if usage is not None else None


# The events a reply streams most of, which open and close no tool call.
_RUNS = frozenset({str, Reasoning})


def unfinished_calls(events: Sequence[Event], status: str) -> list[Event]:
    """The events that close a reply's tool calls that have no outcome, as failed (a cancel, say, stopped the
    agent while a tool ran): the model, on a later turn, and the user see every call answered."""
    started: dict[str, str] = {}  # call id → tool name, for calls whose input was still streaming
    raw: dict[str, str] = {}
    open_calls: dict[str, None] = {}
    for kind, same in groupby(events, type):
        if kind in _RUNS:
            continue
        for event in same:
            if isinstance(event, ToolInputStart):
                started[event.call_id], raw[event.call_id] = event.name, ""
                open_calls[event.call_id] = None
            elif isinstance(event, ToolInputDelta) and event.call_id in raw:
                raw[event.call_id] += event.delta
            elif isinstance(event, ToolCall):
                started.pop(event.call_id, None)
                open_calls[event.call_id] = None
            elif isinstance(event, (ToolResult, ToolError)):
                open_calls.pop(event.call_id, None)
    if not open_calls:
        return []
    error = f"Cancelled: {_STATUS_WORDS.get(status, 'the reply ended')} before the tool call finished."
    closing: list[Event] = []
    for call_id in open_calls:
        if call_id in started:  # its input never completed: it is what the model had sent
            text = raw[call_id]
            closing.append(ToolCall(call_id, started[call_id], _json_or_text(text)))
        closing.append(ToolError(call_id, error))
    return closing


def stored(value: object) -> str | None:
    """A reply's parts or usage as every store keeps them: compact JSON (no stored text then reads as another key's
    `"name": value`, which Redis' scripts look for), or None for none."""
    return None if value is None else _compact(value)


# json.dumps with any argument of its own builds an encoder on every call (a reply that acts stores its parts at
# each checkpoint and at its end): one encoder, the same text.
_compact = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _partial_json(text: str) -> Any:
    # What a client shows of an input still streaming; history keeps it only until the call is complete.
    try:
        return json.loads(text)
    except ValueError:
        return None


# Events as JSON, for what carries a reply's events between processes (the Redis coordinator's mirror for rejoins).
_KINDS: dict[str, type[Any]] = {
    kind.__name__: kind
    for kind in (Reasoning, Step, ToolInputStart, ToolInputDelta, ToolCall, ToolResult, ToolError, Usage)
}


def encode(event: Event) -> str:
    """An event that is not text, as JSON (see :func:`decode`)."""
    fields = {field.name: getattr(event, field.name) for field in dataclasses.fields(event)}  # type: ignore[arg-type]
    return json.dumps([type(event).__name__, fields], default=str, separators=(",", ":"))


def decode(data: str) -> Event:
    kind, fields = json.loads(data)
    return _KINDS[kind](**fields)  # type: ignore[no-any-return]
