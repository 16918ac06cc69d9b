"""``make demo``: a reply that reasons and calls a tool, on a fresh machine, with no model server and no GPU.

It starts three things on loopback: the tests' scripted OpenAI-compatible model server (tests/openai_stub.py,
which streams its reasoning, calls the ``add`` tool, then answers, whatever it is asked), the example MCP server
(tests/mcp_server.py, over stdio, started by parley itself from an ``mcpServers`` config) and parley (``uvicorn
app:app``) wired to both with the ``openai`` agent; then it says what to open. Ctrl-C stops them all.

    python -m tests.demo [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import free_port
from tests.openai_stub import OpenAIStub

ROOT = Path(__file__).resolve().parent.parent

REASONING = [
    "The user wrote to parley's scripted demo model. ",
    "Whatever they asked, I show a tool call: ",
    "the example MCP server has an add tool, ",
    "so I will add 2 and 3 with it.",
]
ANSWER = [
    "The example MCP server's ",
    "`add` tool ",
    "says 2 + 3 = 5. ",
    "(This is a scripted model: every message gets this reply. ",
    "Set PARLEY_OPENAI_BASE_URL to a real one, ",
    "and PARLEY_MCP_CONFIG to your MCP servers.)",
]


AFTER_THE_TOOL = ["The tool answered 5: ", "now I can reply."]


class ScriptedModel(OpenAIStub):
    """The scripted model: reasoning (as vLLM and Ollama send it), one call of ``add``, then its answer, whatever it
    is asked. It reasons about what comes next: the call, or, once the tool has answered, the reply."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        messages: list[Message] = []
        while not messages or messages[-1].get("more_body"):
            messages.append(await receive())
        try:
            asked = json.loads(b"".join(m.get("body", b"") for m in messages))["messages"]
            answered = bool(asked) and asked[-1].get("role") == "tool"
        except (ValueError, KeyError, TypeError, AttributeError):
            answered = False
        self.reasoning = AFTER_THE_TOOL if answered else REASONING

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await super().__call__(scope, replay, send)


def model() -> OpenAIStub:
    return ScriptedModel(
        tokens=ANSWER,
        reasoning=REASONING,
        reasoning_field="reasoning",
        tool_plan=[[{"name": "add", "arguments": {"a": 2, "b": 3}}]],
        behaviour="tools",
        delay=0.08,
    )


def serve_in_thread(app: object, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the scripted model server did not start")
        time.sleep(0.01)
    return server


def environment(model_port: int, directory: Path) -> dict[str, str]:
    """parley's settings for the demo: the openai agent at the scripted model, the example MCP server's tools."""
    config = directory / "mcp.json"
    example = {"command": sys.executable, "args": ["-m", "tests.mcp_server"], "cwd": str(ROOT)}
    config.write_text(json.dumps({"mcpServers": {"example": example}}))
    return {
        "PARLEY_AGENT": "openai",
        "PARLEY_OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
        "PARLEY_OPENAI_MODEL": "scripted-demo",
        "PARLEY_MCP_CONFIG": str(config),
        "PARLEY_DATA_DIR": str(directory / "data"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args()
    model_port = free_port()
    stub = serve_in_thread(model(), model_port)
    with tempfile.TemporaryDirectory(prefix="parley-demo-") as directory:
        env = {**os.environ, **environment(model_port, Path(directory))}
        command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(args.port)]
        print(f"scripted model server: http://127.0.0.1:{model_port}/v1 (reasons, calls add, answers)")
        print("example MCP server: tests/mcp_server.py over stdio (parley starts it)")
        print(f"\n  Open http://127.0.0.1:{args.port}/ and send any message.\n")
        print("Expand the reasoning, watch the tool card go from running to done, press Stop during a reply.")
        print("Ctrl-C stops everything.\n")
        process = subprocess.Popen(command, cwd=ROOT, env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait(10)
            return 0
        finally:
            stub.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
