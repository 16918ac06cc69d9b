"""``uvicorn bench.acting:app``: parley as ``uvicorn app:app`` serves it, with one agent that reasons and calls
tools instead of the echo agent, for the figures of a reply that acts (``make bench``) and the instruction counts
per event of each kind (``make bench-instructions``).

The agent echoes the message one word per token, as the echo agent does, and ``BENCH_ACTING`` says how:

- ``half`` (the default): the first half of the words as reasoning, the rest as text, with a tool call
  (start, one input delta, the call, its result) after every ``BENCH_TOOL_EVERY`` words (1,000);
- ``reasoning``: every word as reasoning;
- ``tools``: every word a tool call of its own, the word its input and its output;
- ``text``: every word as text (the echo agent, but see below).

A message whose first word is ``pace=<seconds>`` is answered at that pace (that word left out), whatever
``PARLEY_ECHO_DELAY`` says: figure 10 interrupts (or queues behind) a slow reply with a message whose reply starts
at once, so that its first byte is parley's doing, not the agent's pause before its first token.

Why a bench agent rather than the ``openai`` agent against a scripted model server: the figure is what parley
does with the events (the turn, the parts, the SSE frames, the store), and a model server in another process
would share the two cores and add its own JSON and HTTP to every token, which is the ``openai`` agent's cost
(figure 6 and the tool-call overhead measure that one). This one yields the same records the ``openai`` agent
yields (:mod:`parley.agents.events`), at the pace of ``PARLEY_ECHO_DELAY``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncGenerator
from typing import Any

import anyio

from parley import Agents, Settings, SettingsError, create_app, logs, metrics
from parley.agents.events import Reasoning, ToolCall, ToolInputDelta, ToolInputStart, ToolResult

_TOKEN = re.compile(r"\s*\S+\s*|\s+")
TOOL = "lookup"


class ActingAgent:
    """Echoes the message as reasoning, text and tool calls (see the module's docstring)."""

    name = "acting"
    description = "Echoes your message as reasoning, text and tool calls (for benchmarks)."
    history_limit = 0

    def __init__(self, mode: str = "half", tool_every: int = 1000, delay: float = 0.0) -> None:
        if mode not in ("half", "reasoning", "tools", "text"):
            raise SettingsError(f"BENCH_ACTING={mode!r}: half, reasoning, tools or text")
        self.mode, self.tool_every, self.delay = mode, tool_every, delay

    async def reply(self, turn: Any) -> AsyncGenerator[Any, None]:
        tokens = _TOKEN.findall(turn.message)
        delay = self.delay
        if tokens and tokens[0].startswith("pace="):
            delay = float(tokens.pop(0).strip().removeprefix("pace="))
        half = {"half": len(tokens) // 2, "reasoning": len(tokens)}.get(self.mode, 0)
        tool_every = self.tool_every if self.mode == "half" else 0
        for index, token in enumerate(tokens):
            await anyio.sleep(delay)
            if self.mode == "tools" or (tool_every and index and index % tool_every == 0):
                call_id = f"call_{index}"
                word = token.strip()
                yield ToolInputStart(call_id, TOOL)
                yield ToolInputDelta(call_id, f'{{"q": "{word}"}}')
                yield ToolCall(call_id, TOOL, {"q": word})
                yield ToolResult(call_id, {"a": word})
                if self.mode == "tools":
                    continue
            yield Reasoning(token) if index < half else token


def acting_app(logging_and_metrics: bool = True) -> Any:
    """As :func:`parley.serve_from_environment` makes ``uvicorn app:app``'s app, with this agent alone (the
    process's logging and metrics left as they are with ``logging_and_metrics=False``, as ``make
    bench-instructions`` counts parley; the collector is tuned either way)."""
    settings = Settings.from_env()
    if logging_and_metrics:
        logs.configure(settings.log_format)
        if settings.metrics:
            metrics.share_across_workers()
    mode = os.environ.get("BENCH_ACTING", "half")
    agent = ActingAgent(mode, int(os.environ.get("BENCH_TOOL_EVERY", "1000")), settings.echo_delay)
    return create_app(settings, agents=Agents([agent]), owns_process=True)


def __getattr__(name: str) -> Any:
    # ``uvicorn bench.acting:app`` makes the app when it asks for it, not whoever imports the module.
    if name == "app":
        return acting_app()
    raise AttributeError(name)
