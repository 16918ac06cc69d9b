"""Agents: what answers a chat message.

An agent is any object with a ``name``, a ``description`` and ``reply(turn)``, an async iterator of
text tokens (see :class:`agents.base.Agent`). A new agent is one new module; :class:`Agents` is the
registry the app looks names up in.
"""

from __future__ import annotations

from collections.abc import Iterator

from agents.base import Agent, AgentError, Attachment, HistoryEntry, Turn, UpstreamError
from agents.echo import EchoAgent
from agents.openai import OpenAIAgent

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
]


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
