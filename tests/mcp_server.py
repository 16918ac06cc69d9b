"""A real MCP server for the tests and for ``make demo``, written with the official ``mcp`` package.

    python -m tests.mcp_server                      # over stdio (what an "mcpServers" "command" entry runs)
    python -m tests.mcp_server --http --port 8123   # over streamable HTTP, at http://127.0.0.1:8123/mcp

Its tools: ``add`` (fast), ``now`` (the server's clock, which bench/tool_overhead.py reads), ``slow`` (sleeps,
and records in the file named by PARLEY_MCP_RECORD whether it finished or was cancelled: one JSON line per
event), ``fail`` (raises: the model sees the error) and ``die`` (the process exits at once, as a crashed server
does: the tests' restart case). ``--prefix`` puts a prefix on every tool's name, so that two servers can be run
side by side without a clash (or, without it, with one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError


def record(path: str | None, event: str, **fields: Any) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"event": event, "at": time.time(), "pid": os.getpid(), **fields}) + "\n")


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What the servers wrote to a PARLEY_MCP_RECORD file, in order."""
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.endswith("\n")]
    except FileNotFoundError:
        return []


def make_server(prefix: str = "", record_to: str | None = None) -> MCPServer:
    """The server; ``record_to`` is the file its ``slow`` and ``die`` tools record in (PARLEY_MCP_RECORD by
    default)."""
    record_to = record_to or os.environ.get("PARLEY_MCP_RECORD")
    server = MCPServer("parley-example", instructions="Example tools for parley's tests and demo.", log_level="WARNING")

    @server.tool(name=f"{prefix}add", description="Add two numbers.")
    async def add(a: float, b: float) -> float:
        return a + b

    @server.tool(name=f"{prefix}now", description="The server's clock: seconds since the epoch.")
    async def now() -> float:
        return time.time()

    @server.tool(name=f"{prefix}slow", description="Wait for the given number of seconds, then say so.")
    async def slow(seconds: float = 30.0, tag: str = "") -> str:
        record(record_to, "started", tool="slow", tag=tag)
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            record(record_to, "cancelled", tool="slow", tag=tag)
            raise
        record(record_to, "finished", tool="slow", tag=tag)
        return f"waited {seconds} s"

    @server.tool(name=f"{prefix}fail", description="Always fails, with the given message.")
    async def fail(message: str = "it went wrong") -> str:
        raise ToolError(message)

    @server.tool(name=f"{prefix}die", description="Ends this server's process at once (as a crash does).")
    async def die() -> str:
        record(record_to, "died", tool="die")
        os._exit(3)

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--prefix", default="", help="put this before every tool's name")
    args = parser.parse_args()
    server = make_server(args.prefix)
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
