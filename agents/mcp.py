"""Tools from MCP servers (the Model Context Protocol), through the official ``mcp`` client (``parley[mcp]``).

``PARLEY_MCP_CONFIG`` names a JSON file in the format MCP clients keep::

    {"mcpServers": {"files": {"command": "npx", "args": ["-y", "..."], "env": {}},   # stdio: parley runs it
                    "search": {"url": "http://127.0.0.1:8123/mcp",                 # streamable HTTP
                               "headers": {"Authorization": "Bearer ..."}}}}      # (headers: if it wants some)

Each server's connection is kept by a task of its own, in the task group that :meth:`MCPTools.run` opens (the app's
lifespan runs it): the client's own tasks live inside that connection, and a connection that breaks takes only
that task's body down. A call is made from the reply's task, in the reply's cancel scope: cancelling the scope
makes the client tell the server (``notifications/cancelled``, or the request aborted on newer HTTP connections),
whose handler is cancelled. A connection found broken (a stdio server that died, an HTTP server gone) is opened
again for the next call. Mounted without its lifespan, parley opens a connection per call instead, in the call's
own task (slower, and as correct).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import anyio
import httpx2
from anyio.abc import TaskStatus
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, CallToolResult

from parley.agents.tools import Tool, ToolFailed
from parley.settings import SettingsError

logger = logging.getLogger("parley.agents.mcp")

# How often listing the tools tries again a server that could not be reached (a call tries at once).
_RETRY_SECONDS = 5.0

# What a server is: a URL (streamable HTTP), a command to run (stdio), or (handed in by a host) a server object.
Target: TypeAlias = "str | HTTPServer | StdioServerParameters | MCPServer | Server[Any]"


@dataclass(frozen=True)
class HTTPServer:
    """A streamable-HTTP server whose requests carry headers of their own (an ``Authorization``, say)."""

    url: str
    headers: Mapping[str, str] = field(repr=False)  # (secrets: kept out of logs)


class ToolNameClash(SettingsError):
    """Two MCP servers offer a tool of the same name: the model could not tell them apart."""


def load_config(path: str | os.PathLike[str]) -> dict[str, Target]:
    """The servers a PARLEY_MCP_CONFIG file names. Raises :class:`SettingsError` (one line) for a file parley
    cannot use."""
    where = f"PARLEY_MCP_CONFIG ({path})"
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SettingsError(f"{where} is not valid JSON: {exc}") from None
    servers = config.get("mcpServers") if isinstance(config, dict) else None
    if not isinstance(servers, dict):
        raise SettingsError(f'{where} must be a JSON object with an "mcpServers" object')
    targets: dict[str, Target] = {}
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: server {name!r} must be an object")
        url, command = entry.get("url"), entry.get("command")
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            headers = entry.get("headers")
            if headers is not None and not (
                isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())
            ):
                raise SettingsError(f'{where}: server {name!r}: "headers" must be an object of strings')
            targets[name] = HTTPServer(url, headers) if headers else url
        elif isinstance(command, str) and command:
            args, env, cwd = entry.get("args", []), entry.get("env"), entry.get("cwd")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise SettingsError(f'{where}: server {name!r}: "args" must be a list of strings')
            if env is not None and not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
                raise SettingsError(f'{where}: server {name!r}: "env" must be an object of strings')
            if cwd is not None and not isinstance(cwd, str):
                raise SettingsError(f'{where}: server {name!r}: "cwd" must be a string')
            targets[name] = StdioServerParameters(command=command, args=args, env=env, cwd=cwd)
        else:
            raise SettingsError(f'{where}: server {name!r} needs a "command" (stdio) or an http(s) "url"')
    return targets


class MCPTools:
    """The tools of some MCP servers, as one toolbox (see :class:`parley.agents.tools.Toolbox`).

    ``servers`` maps a name to what :func:`load_config` makes, or, for a host that embeds parley, to an
    ``MCPServer`` (or low-level ``Server``) object served in process.
    """

    def __init__(self, servers: Mapping[str, Target], *, connect_timeout: float = 60.0) -> None:
        self.servers = [_Connection(name, target, connect_timeout) for name, target in servers.items()]
        self._tools: dict[str, tuple[_Connection, Tool]] | None = None
        self._listed: tuple[int, ...] = ()  # which listings self._tools was made from
        self._running = False
        self._lock = anyio.Lock()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connects to every server, lists their tools, and keeps the connections until cancelled. Raises
        :class:`ToolNameClash` (before it reports started) when two servers offer a tool of the same name."""
        if self._running:
            raise RuntimeError("MCPTools.run is already running")
        clash: ToolNameClash | None = None
        try:
            async with anyio.create_task_group() as task_group:
                for server in self.servers:
                    await task_group.start(server.keep_open)
                try:
                    self._tools = self._index(refuse=True)
                except ToolNameClash as exc:
                    clash = exc  # (raised below as itself, not wrapped in the task group's exception group)
                    task_group.cancel_scope.cancel()
                else:
                    self._listed = tuple(id(server.tools) for server in self.servers)
                    self._running = True
                    task_status.started()
        finally:
            self._running = False
        if clash is not None:
            raise clash

    async def list_tools(self) -> Sequence[Tool]:
        if self._running:
            # A server that could not be reached (at start, or since) is tried again, without waiting for it: its
            # tools are offered once it answers.
            for server in self.servers:
                server.want()
            listed = tuple(id(server.tools) for server in self.servers)
            if listed != self._listed:
                self._tools, self._listed = self._index(refuse=False), listed
        elif self._tools is None:
            async with self._lock:
                if self._tools is None:  # first use, without the lifespan: list each server once
                    for server in self.servers:
                        await server.list_once()
                    self._tools = self._index(refuse=False)
        assert self._tools is not None
        return [tool for _, tool in self._tools.values()]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        if self._tools is None:
            await self.list_tools()
        assert self._tools is not None
        found = self._tools.get(name)
        if found is None:
            raise ToolFailed(f"There is no tool named {name!r}.")
        server, _ = found
        result = await (server.call(name, arguments) if self._running else server.call_once(name, arguments))
        return _output(result)

    def _index(self, *, refuse: bool) -> dict[str, tuple[_Connection, Tool]]:
        tools: dict[str, tuple[_Connection, Tool]] = {}
        for server in self.servers:
            for tool in server.tools:
                if tool.name in tools:
                    clash = (
                        f"the MCP servers {tools[tool.name][0].name!r} and {server.name!r} both offer a tool named "
                        f"{tool.name!r}; remove one of them from PARLEY_MCP_CONFIG"
                    )
                    if refuse:
                        raise ToolNameClash(clash)
                    logger.error("%s (%r's is not offered)", clash, server.name)
                    continue
                tools[tool.name] = (server, tool)
        return tools


class _Connection:
    """One MCP server: its tools, and (while :meth:`keep_open` runs) a connection to it."""

    def __init__(self, name: str, target: Target, connect_timeout: float) -> None:
        self.name = name
        self.target = target
        self.connect_timeout = connect_timeout
        self.tools: list[Tool] = []
        self._client: Client | None = None
        self._gone = anyio.Event()  # set when a call finds the connection broken
        self._wanted = anyio.Event()  # set when a call wants a (new) connection
        self._attempt = anyio.Event()  # set when the next (or current) attempt to connect ends
        self._tried_at = -math.inf

    async def keep_open(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connects now, and again when a call wants a connection after it was lost; reports started after the
        first attempt, whether it connected or not (a server that is down at start is tried again on first use).

        While connected, ``_client`` is the client and ``_attempt`` is set; while not, ``_client`` is None and
        ``_attempt`` is set when the next (or current) attempt to connect ends."""
        self._wanted.set()
        started = False
        while True:
            await self._wanted.wait()
            self._wanted, attempt, self._tried_at = anyio.Event(), self._attempt, anyio.current_time()
            connected: Client | None = None
            try:
                with anyio.CancelScope(deadline=anyio.current_time() + self.connect_timeout) as deadline:
                    async with _client(self.target) as client:
                        self.tools = await _list_tools(client)
                        deadline.deadline = math.inf
                        connected = self._client = client
                        self._gone = anyio.Event()
                        attempt.set()
                        if not started:
                            started = True
                            task_status.started()
                        await self._gone.wait()
                if deadline.cancelled_caught:
                    logger.warning("MCP server %r did not answer within %g s", self.name, self.connect_timeout)
            except Exception as exc:
                logger.warning("MCP server %r: %s", self.name, _describe(exc))
            finally:
                if connected is not None:
                    self._lose(connected)
                else:
                    self._attempt = anyio.Event()
                attempt.set()
            if not started:
                started = True
                task_status.started()

    def want(self) -> None:
        """Not connected: have the keeper try again (this does not wait for it), at most every few seconds: every
        reply lists the tools, and a server that is down must not be tried by each."""
        if self._client is None and anyio.current_time() >= self._tried_at + _RETRY_SECONDS:
            self._wanted.set()

    def _lose(self, client: Client) -> None:
        """The connection broke: the next call asks for a new one (the keeper closes this one)."""
        if self._client is client:
            self._client, self._attempt = None, anyio.Event()
            self._gone.set()

    async def call(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        client = self._client
        if client is None:
            # Not connected (it broke, or was down at start): ask the keeper for a connection, and wait for it.
            attempt = self._attempt
            self._wanted.set()
            await attempt.wait()
            client = self._client
            if client is None:
                raise ToolFailed(f"The MCP server {self.name!r} cannot be reached.")
        try:
            return await client.call_tool(name, arguments)
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                self._lose(client)
                raise ToolFailed(
                    f"The connection to the MCP server {self.name!r} was lost during the call "
                    "(it is opened again for the next call)."
                ) from None
            raise ToolFailed(f"The MCP server {self.name!r} refused the call: {exc}") from None

    async def list_once(self) -> None:
        try:
            with anyio.fail_after(self.connect_timeout):
                async with _client(self.target) as client:
                    self.tools = await _list_tools(client)
        except Exception as exc:
            logger.warning("MCP server %r: %s", self.name, _describe(exc))

    async def call_once(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        """A call on a connection of its own, opened and closed in the caller's task."""
        try:
            async with _client(self.target) as client:
                return await client.call_tool(name, arguments)
        except MCPError as exc:
            raise ToolFailed(f"The MCP server {self.name!r} refused the call: {exc}") from None
        except Exception as exc:
            raise ToolFailed(f"The MCP server {self.name!r} cannot be reached: {_describe(exc)}") from None


def _client(target: Target) -> Client:
    if isinstance(target, HTTPServer):
        return Client(_with_headers(target))
    return Client(target)


@asynccontextmanager
async def _with_headers(server: HTTPServer) -> AsyncIterator[Any]:
    # (The transport closes a client it made, not one it is given: this one is closed here.)
    timeout = httpx2.Timeout(30.0, read=300.0)  # (the mcp client's own defaults)
    async with (
        httpx2.AsyncClient(headers=dict(server.headers), timeout=timeout) as http,
        streamable_http_client(server.url, http_client=http) as streams,
    ):
        yield streams


async def _list_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools.extend(Tool(t.name, t.description or "", t.input_schema) for t in page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _output(result: CallToolResult) -> Any:
    """What a tool returned, as the model and the user are given it: its text, or its structured content."""
    texts = [getattr(c, "text", None) or f"[{c.type} content]" for c in result.content]
    if result.is_error:
        raise ToolFailed("\n".join(texts) or "The tool failed.")
    if texts:
        return "\n".join(texts)
    return result.structured_content if result.structured_content is not None else ""


def _describe(exc: BaseException) -> str:
    """One line for a failure to connect, which may come wrapped in exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
