from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import anyio
import anyio.lowlevel

from parley.agents.events import Event


@dataclass(frozen=True)
class HistoryEntry:
    """An earlier message of the session. ``parts`` are its AI SDK UIMessage parts (text, reasoning, step-start,
    dynamic-tool; see :mod:`parley.agents.events`), or empty when the message is its ``content`` alone."""

    role: Literal["user", "assistant"]
    content: str
    parts: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Attachment:
    """A file handed to the agent with a message: its text when it is text, else only what it is."""

    filename: str
    mime_type: str
    size: int
    text: str | None = None


@dataclass(frozen=True)
class Turn:
    session_id: str
    message: str
    history: Sequence[HistoryEntry] = ()
    files: Sequence[Attachment] = field(default_factory=tuple)


class AgentError(Exception):
    """The agent could not produce its reply. The message is safe to show to a client."""


class Agent(Protocol):
    """Something that answers a turn as an async generator of events: a bare ``str`` is a piece of text, and an
    agent that reasons or acts also yields the records of :mod:`parley.agents.events`.

    The iterator is closed (``aclose``) when the interaction ends early: a cancel, a disconnect,
    a deleted session. Whatever it holds (an upstream HTTP response, say) must be released there.
    """

    name: str
    description: str
    # How many of the session's latest messages the agent is given as history (0: none).
    history_limit: int

    def reply(self, turn: Turn) -> AsyncGenerator[Event, None]: ...


class UpstreamError(AgentError):
    """The model server behind the agent refused, failed, or went silent."""


def pace(delay: float) -> Callable[[], Awaitable[None]]:
    """What an agent that streams at a fixed pace awaits before each token: ``anyio.sleep(delay)``, or with no delay a
    checkpoint, so that a fast agent still lets a cancel in (and other streams run) between its tokens. Call it in
    the task that runs the reply, once per reply."""
    # anyio.sleep() and anyio.lowlevel.checkpoint() find the running event loop's backend anew on every call
    # (through sniffio: more instructions than the rest of a token's own work, make bench-instructions); the
    # backend's own sleep and checkpoint, looked up once, are the very calls they make.
    backend = anyio.lowlevel.current_token().backend_class
    if delay:
        return partial(backend.sleep, delay)
    return backend.checkpoint
