"""Tools an agent may call: what one is (:class:`Tool`), and where calls go (a :class:`Toolbox`).

The ``openai`` agent offers a toolbox's tools to its model and runs the calls the model makes through it. parley's
own toolbox is :class:`parley.agents.mcp.MCPTools` (tools from MCP servers); a host may hand in any object with
the same two methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    # The JSON Schema of the tool's arguments (an object).
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def describe(self) -> dict[str, str]:
        """What ``GET /api/v1/agents`` says of it."""
        return {"name": self.name, "description": self.description}


class ToolFailed(Exception):
    """A call that did not return a result. The message is what the model (and the user) are told."""


class Toolbox(Protocol):
    async def list_tools(self) -> Sequence[Tool]:
        """The tools on offer now (a toolbox may connect to its servers on first use)."""
        ...

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run a tool; returns what it returned (JSON-serialisable). Raises :class:`ToolFailed` for a failure the
        model should hear about. Cancelling the caller's scope stops the call where it is."""
        ...
