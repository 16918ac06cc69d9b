"""An agent that acts, as a host's own agent would: it reasons, calls a tool, and answers, yielding the records of
:mod:`parley.agents.events`. The tests of parts, the page and the AI SDK run it in process (``create_app(agents=
...)``) and as ``uvicorn tests.acting:app`` (kill -9, two workers on Redis).

A message with ``slow`` in it makes the tool take a minute (to cancel it mid-call); ``PARLEY_ACTING_DELAY`` (or
``delay``) spaces the events out, ``PARLEY_ACTING_TOOL_SECONDS`` (or ``tool_seconds``) is how long the tool takes
otherwise. What became of each tool run is in ``tool_runs``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator

import anyio

from parley.agents import Agents, EchoAgent, Turn
from parley.agents.events import Event, Reasoning, Step, ToolCall, ToolInputDelta, ToolInputStart, ToolResult, Usage

REASONING = ["The user ", "wants a sum: ", "I will use the tool."]
BEFORE_TOOL = ["Let me ", "add."]
ANSWER = ["2 + 3 ", "is ", "5."]
TEXT = "".join(BEFORE_TOOL + ANSWER)
INPUT = {"a": 2, "b": 3}
OUTPUT = {"sum": 5}
USAGE = {"input_tokens": 30, "output_tokens": 8, "total_tokens": 38, "reasoning_tokens": 3}

# The parts useChat keeps for the reply, and history returns.
PARTS = [
    {"type": "step-start"},
    {"type": "reasoning", "id": "reasoning-0", "text": "".join(REASONING), "state": "done"},
    {"type": "text", "text": "".join(BEFORE_TOOL), "state": "done"},
    {
        "type": "dynamic-tool",
        "toolName": "add",
        "toolCallId": "call_1",
        "state": "output-available",
        "input": INPUT,
        "output": OUTPUT,
    },
    {"type": "step-start"},
    {"type": "text", "text": "".join(ANSWER), "state": "done"},
]


class ActingAgent:
    name = "acting"
    description = "Reasons, calls a tool, answers (a test agent)."
    history_limit = 10

    def __init__(self, delay: float = 0.0, tool_seconds: float = 0.0) -> None:
        self.delay = delay
        self.tool_seconds = tool_seconds
        self.tool_runs: list[str] = []  # "finished" or "cancelled", one per tool call

    async def reply(self, turn: Turn) -> AsyncGenerator[Event, None]:
        yield Step()
        for piece in REASONING:
            await anyio.sleep(self.delay)
            yield Reasoning(piece)
        for piece in BEFORE_TOOL:
            await anyio.sleep(self.delay)
            yield piece
        yield ToolInputStart("call_1", "add")
        yield ToolInputDelta("call_1", '{"a": 2, ')
        await anyio.sleep(self.delay)
        yield ToolInputDelta("call_1", '"b": 3}')
        yield ToolCall("call_1", "add", INPUT)
        await self._tool(60.0 if "slow" in turn.message else self.tool_seconds)
        yield ToolResult("call_1", OUTPUT)
        yield Usage(10, 5, 15, reasoning_tokens=3)
        yield Step()
        for piece in ANSWER:
            await anyio.sleep(self.delay)
            yield piece
        yield Usage(20, 3, 23)

    async def _tool(self, seconds: float) -> None:
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.tool_runs.append("cancelled")
            raise
        self.tool_runs.append("finished")


def agents(delay: float = 0.0, tool_seconds: float = 0.0, echo_delay: float = 0.0) -> Agents:
    return Agents([EchoAgent(echo_delay), ActingAgent(delay, tool_seconds)], default="acting")


def _app() -> object:
    from parley.app import create_app
    from parley.settings import Settings

    delay = float(os.environ.get("PARLEY_ACTING_DELAY", "0"))
    tool_seconds = float(os.environ.get("PARLEY_ACTING_TOOL_SECONDS", "0"))
    settings = Settings.from_env()
    # (The echo agent as the app builds it: PARLEY_ECHO_DELAY spaces its words out, as make soak asks.)
    return create_app(settings, agents=agents(delay, tool_seconds, settings.echo_delay), owns_process=True)


def __getattr__(name: str) -> object:
    # `uvicorn tests.acting:app`: made on first use, so that importing the agent builds no app.
    if name == "app":
        return _app()
    raise AttributeError(name)
