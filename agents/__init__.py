"""Agents: what answers a chat message.

An agent is any object with a ``name``, a ``description`` and ``reply(turn)``, an async iterator of
text and events (see :class:`agents.base.Agent` and :mod:`agents.events`). One that calls tools offers
``list_tools()``, and one that holds connections open (to MCP servers, see :mod:`agents.mcp`) a ``run()`` that the
app's lifespan runs. A new agent is one new module with a ``from_settings(settings)``
that makes the agent, or None when it is not configured, listed once in :data:`FACTORIES`; :class:`Agents` is
the registry the app looks names up in. (Its PARLEY_* variables are declared in ``settings.py``, with the rest.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import anyio
from anyio.abc import TaskStatus

from parley.agents import echo, openai
from parley.agents.base import Agent, AgentError, Attachment, HistoryEntry, Turn, UpstreamError
from parley.agents.echo import EchoAgent
from parley.agents.openai import OpenAIAgent
from parley.agents.tools import Tool, Toolbox, ToolFailed
from parley.settings import Settings, SettingsError

__all__ = [
    "Agent",
    "AgentError",
    "Agents",
    "Attachment",
    "EchoAgent",
    "HistoryEntry",
    "OpenAIAgent",
    "Tool",
    "ToolFailed",
    "Toolbox",
    "Turn",
    "UnknownAgent",
    "UpstreamError",
    "configured",
    "tools_of",
]

# Every agent this server knows, in the order GET /api/v1/agents lists them; the first is the default default.
FACTORIES: tuple[Callable[[Settings], Agent | None], ...] = (echo.from_settings, openai.from_settings)


class UnknownAgent(LookupError):
    pass


class Agents:
    """The agents this app serves, by name, and which one new sessions get by default."""

    def __init__(self, agents: list[Agent], default: str | None = None) -> None:
        self._by_name = {agent.name: agent for agent in agents}
        if not self._by_name:
            raise ValueError("at least one agent is needed")
        self.default = default or agents[0].name
        if self.default not in self._by_name:
            raise UnknownAgent(self.default)

    def __getitem__(self, name: str) -> Agent:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownAgent(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Agent]:
        return iter(self._by_name.values())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keeps open what the agents hold open (connections to MCP servers) until cancelled: the app's lifespan
        runs it, and it reports started once they are ready (or raises, on a configuration they refuse)."""
        async with anyio.create_task_group() as task_group:
            for agent in self:
                run = getattr(agent, "run", None)
                if run is not None:
                    await task_group.start(run)
            task_status.started()

    async def aclose(self) -> None:
        """Release what the agents hold (an HTTP client, say)."""
        for agent in self:
            aclose = getattr(agent, "aclose", None)
            if aclose is not None:
                await aclose()


async def tools_of(agent: Agent) -> Sequence[Tool]:
    """The tools an agent offers its model (none, for an agent that has no ``list_tools``)."""
    list_tools = getattr(agent, "list_tools", None)
    return await list_tools() if list_tools is not None else ()


def configured(settings: Settings) -> Agents:
    """The agents that ``settings`` configure, with PARLEY_AGENT as the default for new sessions."""
    agents = [agent for factory in FACTORIES if (agent := factory(settings)) is not None]
    try:
        return Agents(agents, default=settings.agent)
    except UnknownAgent:
        raise SettingsError(f"PARLEY_AGENT={settings.agent!r} names no configured agent") from None
