"""The overhead parley adds around a tool call: ``python -m bench.tool_overhead [--calls 300]``.

The ``openai`` agent against the tests' stub model server (real HTTP, uvicorn in a thread) and the example MCP
server over stdio (a process of its own), with one tool call per reply. Two intervals, on the wall clock that
both processes share:

- *to the tool*: from the stub sending the call's last fragment to the MCP server's handler starting (parley reads
  the end of the model's stream, parses the call, sends ``tools/call``; the server parses and dispatches it);
- *to the model*: from the handler starting to the stub receiving the next request (the result goes back to
  parley, which appends it and calls the model again).

Each includes the MCP server's own work (the SDK's parsing and dispatch), which parley does not control. Target:
p99 of each at most 3 ms. ``make bench`` runs it pinned to the server core, on each stack's event loop
(``--loop asyncio`` or ``uvloop``), and reads its ``--json`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import uvicorn

from parley.agents import OpenAIAgent, Turn
from parley.agents.mcp import MCPTools, load_config
from tests.openai_stub import OpenAIStub

ROOT = Path(__file__).resolve().parent.parent


def serve_stub(stub: OpenAIStub) -> tuple[str, uvicorn.Server]:
    config = uvicorn.Config(stub, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}/v1", server


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(calls: int) -> dict[str, list[float]]:
    stub = OpenAIStub(tokens=["ok"], delay=0.0)
    stub.tool_plan = [[{"name": "now", "arguments": {}}]]
    url, server = serve_stub(stub)
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "mcp.json"
        entry = {"command": sys.executable, "args": ["-m", "tests.mcp_server"], "cwd": str(ROOT)}
        config.write_text(json.dumps({"mcpServers": {"example": entry}}))
        tools = MCPTools(load_config(config))
        figures: dict[str, list[float]] = {"to the tool": [], "to the model": []}
        async with anyio.create_task_group() as task_group:
            await task_group.start(tools.run)
            agent = OpenAIAgent(url, "tools", tools=tools)
            for number in range(calls + 20):
                stub.calls.clear()
                outputs = [e async for e in agent.reply(Turn("bench", "what time is it?")) if hasattr(e, "output")]
                first, second = stub.calls
                handler_at = float(outputs[0].output)
                assert first.last_fragment_at is not None
                if number >= 20:  # (the first ones warm the connections up)
                    figures["to the tool"].append((handler_at - first.last_fragment_at) * 1000)
                    figures["to the model"].append((second.received_at - handler_at) * 1000)
            await agent.aclose()
            task_group.cancel_scope.cancel()
    server.should_exit = True
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the agent's event loop")
    parser.add_argument("--json", action="store_true", help="print the samples as one JSON object (for bench.run)")
    args = parser.parse_args()
    figures = anyio.run(measure, args.calls, backend_options={"use_uvloop": args.loop == "uvloop"})
    if args.json:
        print(json.dumps(figures))
        return
    for name, values in figures.items():
        print(
            f"{name:>13}: p50 {statistics.median(values):.2f} ms, p99 {percentile(values, 99):.2f} ms, "
            f"max {max(values):.2f} ms ({len(values)} calls)"
        )


if __name__ == "__main__":
    main()
