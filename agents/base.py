from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class HistoryEntry:
    role: Literal["user", "assistant"]
    content: str


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
    """Something that answers a turn as an async generator of text tokens.

    The iterator is closed (``aclose``) when the interaction ends early: a cancel, a disconnect,
    a deleted session. Whatever it holds (an upstream HTTP response, say) must be released there.
    """

    name: str
    description: str
    # How many of the session's latest messages the agent is given as history (0: none).
    history_limit: int

    def reply(self, turn: Turn) -> AsyncGenerator[str, None]: ...


class UpstreamError(AgentError):
    """The model server behind the agent refused, failed, or went silent."""
