"""What an agent's reply is made of: the events it yields, as plain records.

An agent's ``reply(turn)`` yields text as bare ``str`` (the common case, and all the echo agent ever yields) and
everything else as one of the records below. Nobody special-cases them: the turn runner keeps them as the reply's
parts (the AI SDK's UIMessage parts, see :mod:`parley.sessions.parts`), a wire format frames them (plain text
streams only the text; the AI SDK's UI message stream frames every kind), and the store keeps the parts.

A tool call goes: :class:`ToolInputStart`, any number of :class:`ToolInputDelta`, then :class:`ToolCall` (its
input complete), then exactly one of :class:`ToolResult` or :class:`ToolError`. A reply that ends (a cancel, say)
between a call and its outcome has that call recorded as failed, so history stays a valid conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of the model's reasoning (its "thinking"), shown apart from the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Step:
    """A new model call begins (the AI SDK's ``start-step``); the previous one, if any, has ended."""


@dataclass(frozen=True, slots=True)
class ToolInputStart:
    """The model began a tool call: its id and the tool's name are known, its input is still streaming."""

    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolInputDelta:
    """A fragment of a tool call's input, as JSON text."""

    call_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call whose input is complete; the tool runs now. ``input`` is the parsed JSON (or the raw text the
    model sent, when it was not valid JSON: a :class:`ToolError` follows)."""

    call_id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool returned (JSON-serialisable)."""

    call_id: str
    output: Any


@dataclass(frozen=True, slots=True)
class ToolError:
    """A tool call that failed: the tool raised, timed out, was cancelled, or its input was not valid JSON. The
    text is what the model (and the user) are told."""

    call_id: str
    error: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one model call used. A reply's usage is the sum over its model calls; a field a server did not
    report is None."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    reasoning_tokens: int | None = None
    cached_input_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        def both(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
            both(self.reasoning_tokens, other.reasoning_tokens),
            both(self.cached_input_tokens, other.cached_input_tokens),
        )

    def to_json(self) -> dict[str, int]:
        fields = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_input_tokens": self.cached_input_tokens,
        }
        return {name: value for name, value in fields.items() if value is not None}


Event = str | Reasoning | Step | ToolInputStart | ToolInputDelta | ToolCall | ToolResult | ToolError | Usage
