"""Agents: what answers a chat message.

An agent is any object with a ``name``, a ``description`` and ``reply(turn)``, an async iterator of
text tokens (see :class:`agents.base.Agent`). A new agent is one new module with a ``from_settings(settings)``
that makes the agent, or None when it is not configured, listed once in :data:`FACTORIES`; :class:`Agents` is
the registry the app looks names up in. (Its PARLEY_* variables are declared in ``settings.py``, with the rest.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from parley.agents import echo, openai
from parley.agents.base import Agent, AgentError, Attachment, HistoryEntry, Turn, UpstreamError
from parley.agents.echo import EchoAgent
from parley.agents.openai import OpenAIAgent
from parley.settings import Settings, SettingsError

__all__ = [
    "Agent",
    "AgentError",
    "Agents",
    "Attachment",
    "EchoAgent",
    "HistoryEntry",
    "OpenAIAgent",
    "Turn",
    "UnknownAgent",
    "UpstreamError",
    "configured",
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

    async def aclose(self) -> None:
        """Release what the agents hold (an HTTP client, say)."""
        for agent in self:
            aclose = getattr(agent, "aclose", None)
            if aclose is not None:
                await aclose()


def configured(settings: Settings) -> Agents:
    """The agents that ``settings`` configure, with PARLEY_AGENT as the default for new sessions."""
    agents = [agent for factory in FACTORIES if (agent := factory(settings)) is not None]
    try:
        return Agents(agents, default=settings.agent)
    except UnknownAgent:
        raise SettingsError(f"PARLEY_AGENT={settings.agent!r} names no configured agent") from None
