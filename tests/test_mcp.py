"""Tools from real MCP servers (tests/mcp_server.py, run over stdio and over streamable HTTP): listing, calls, a cancel
that reaches the tool's handler, timeouts, a server that dies or cannot be reached, a name offered twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from parley.agents import Agents, EchoAgent, OpenAIAgent, ToolFailed, Turn
from parley.agents.events import Event, ToolCall, ToolError, ToolResult
from parley.agents.mcp import MCPTools, ToolNameClash, load_config
from parley.app import create_app
from parley.settings import SettingsError
from tests.conftest import ROOT, LiveServer, eventually, free_port, listens, make_settings, messages, new_session
from tests.mcp_server import make_server, read_records
from tests.openai_stub import OpenAIStub

pytestmark = pytest.mark.anyio


class HTTPServer:
    """tests/mcp_server.py over streamable HTTP, in a process of its own that a test can kill and start again."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HTTPServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.mcp_server", "--http", "--port", str(self.port)],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PARLEY_MCP_RECORD": str(self.record)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not listens(self.process.pid, self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the MCP server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "mcp-record.jsonl"


@pytest.fixture
def http_server(record: Path) -> Iterator[HTTPServer]:
    server = HTTPServer(record).start()
    yield server
    server.stop()


def stdio_entry(record: Path, *args: str) -> dict[str, Any]:
    return {
        "command": sys.executable,
        "args": ["-m", "tests.mcp_server", *args],
        "env": {"PARLEY_MCP_RECORD": str(record)},
        "cwd": str(ROOT),
    }


def write_config(tmp_path: Path, servers: dict[str, Any]) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return str(path)


@pytest.fixture(params=["stdio", "http"])
def config(request: pytest.FixtureRequest, tmp_path: Path, record: Path) -> Iterator[str]:
    """A PARLEY_MCP_CONFIG naming the example server, over each transport."""
    if request.param == "stdio":
        yield write_config(tmp_path, {"example": stdio_entry(record)})
    else:
        server = HTTPServer(record).start()
        yield write_config(tmp_path, {"example": {"url": server.url}})
        server.stop()


@asynccontextmanager
async def running(tools: MCPTools) -> AsyncIterator[MCPTools]:
    async with anyio.create_task_group() as task_group:
        await task_group.start(tools.run)
        yield tools
        task_group.cancel_scope.cancel()


def records(record: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in read_records(record) if r["event"] == event]


@pytest.fixture
def stub() -> OpenAIStub:
    return OpenAIStub(tokens=["Done."], delay=0.001)


@pytest.fixture
def stub_url(serve: Callable[..., LiveServer], stub: OpenAIStub) -> str:
    return serve(stub).url + "/v1"


async def test_tools_are_listed_and_called(config: str) -> None:
    async with running(MCPTools(load_config(config))) as tools:
        assert [t.name for t in await tools.list_tools()] == ["add", "now", "slow", "fail", "die"]
        assert await tools.call_tool("add", {"a": 2, "b": 3}) == "5.0"
        with pytest.raises(ToolFailed, match="boom"):
            await tools.call_tool("fail", {"message": "boom"})
        with pytest.raises(ToolFailed, match="no tool named 'nope'"):
            await tools.call_tool("nope", {})


# (Also under trio: parley serves on it too, under Hypercorn, and the mcp client is anyio's.)
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_cancel_reaches_the_tool_within_a_second(
    config: str, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 60, "tag": "c"}}]]
    events: list[Event] = []
    async with running(MCPTools(load_config(config))) as tools:
        agent = OpenAIAgent(stub_url, "tools", tools=tools)
        scope = anyio.CancelScope()

        async def drive() -> None:
            with scope:
                async with aclosing(agent.reply(Turn("s1", "wait"))) as reply:
                    async for event in reply:
                        events.append(event)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(drive)

            async def started() -> bool:
                return bool(records(record, "started"))

            await eventually(started, within=20)
            cancelled_at = time.time()
            scope.cancel()

        async def seen() -> bool:
            return bool(records(record, "cancelled"))

        await eventually(seen, within=2)
        assert records(record, "cancelled")[0]["at"] - cancelled_at < 1.0
        assert not records(record, "finished")
        await agent.aclose()
    assert [type(e) for e in events if isinstance(e, ToolCall | ToolResult | ToolError)] == [ToolCall]


async def test_a_cancel_through_the_api_stops_the_tool(
    serve: Callable[..., LiveServer], tmp_path: Path, config: str, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 60, "tag": "api"}}]]
    settings = make_settings(
        tmp_path, agent="openai", openai_base_url=stub_url, openai_model="tools", mcp_config=config
    )
    server = serve(create_app(settings))
    async with server.client() as client, server.client() as other:
        listed = (await client.get("/api/v1/agents")).json()["agents"]
        assert {"name": "slow", "description": "Wait for the given number of seconds, then say so."} in [
            tool for agent in listed if agent["name"] == "openai" for tool in agent["tools"]
        ]
        session_id = await new_session(client)
        async with anyio.create_task_group() as task_group:

            async def chat() -> None:
                await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "wait"})

            task_group.start_soon(chat)

            async def started() -> bool:
                return bool(records(record, "started"))

            await eventually(started, within=20)
            cancelled_at = time.time()
            answer = await other.post("/api/v1/cancel", data={"ui_session_id": session_id})
            assert answer.json()["cancelled"] is True

        async def seen() -> bool:
            return bool(records(record, "cancelled"))

        await eventually(seen, within=2)
        assert records(record, "cancelled")[0]["at"] - cancelled_at < 1.0
        assert (await messages(client, session_id))[-1]["status"] == "cancelled"
        # The session goes on: the next message is answered, on a conversation the model server accepts.
        stub.tool_plan = []
        answer = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "again"})
        assert answer.status_code == 200 and answer.text == "Done."
        assert stub.calls[-1].refused is None


async def test_a_tool_that_takes_too_long_is_a_tool_error(
    tmp_path: Path, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 60, "tag": "t"}}]]
    async with running(MCPTools(load_config(write_config(tmp_path, {"example": stdio_entry(record)})))) as tools:
        agent = OpenAIAgent(stub_url, "tools", tools=tools, tool_timeout=0.5)
        events = [e async for e in agent.reply(Turn("s1", "wait"))]
        await agent.aclose()
    (error,) = [e for e in events if isinstance(e, ToolError)]
    assert "did not finish within 0.5 s" in error.error
    assert "".join(e for e in events if isinstance(e, str)) == "Done."
    assert stub.calls[-1].body["messages"][-1]["content"].startswith("Error: ")

    async def seen() -> bool:
        return bool(records(record, "cancelled"))

    await eventually(seen)


async def test_a_stdio_server_that_dies_is_started_again(tmp_path: Path, record: Path) -> None:
    async with running(MCPTools(load_config(write_config(tmp_path, {"example": stdio_entry(record)})))) as tools:
        with pytest.raises(ToolFailed, match="lost"):
            await tools.call_tool("die", {})
        assert await tools.call_tool("add", {"a": 1, "b": 1}) == "2.0"
        with pytest.raises(ToolFailed):
            await tools.call_tool("die", {})
        assert await tools.call_tool("add", {"a": 2, "b": 2}) == "4.0"
    assert len(records(record, "died")) == 2


async def test_an_http_server_that_goes_away_is_a_tool_error_until_it_is_back(
    http_server: HTTPServer, tmp_path: Path
) -> None:
    async with running(MCPTools(load_config(write_config(tmp_path, {"example": {"url": http_server.url}})))) as tools:
        assert await tools.call_tool("add", {"a": 1, "b": 1}) == "2.0"
        http_server.stop()
        for _ in range(2):
            with pytest.raises(ToolFailed):
                await tools.call_tool("add", {"a": 1, "b": 1})
        http_server.start()
        assert await tools.call_tool("add", {"a": 2, "b": 2}) == "4.0"


async def test_an_unreachable_http_server_is_never_a_500(
    serve: Callable[..., LiveServer], tmp_path: Path, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    away = HTTPServer(record)
    config = write_config(tmp_path, {"away": {"url": away.url}})
    settings = make_settings(tmp_path, agent="openai", openai_base_url=stub_url, mcp_config=config)
    server = serve(create_app(settings))
    async with server.client() as client:
        response = await client.get("/api/v1/agents")
        assert response.status_code == 200
        assert [a["tools"] for a in response.json()["agents"]] == [[], []]
        session_id = await new_session(client)
        answer = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert answer.status_code == 200 and answer.text == "Done."
        # Once it answers, its tools are offered.
        away.start()
        try:

            async def listed() -> bool:
                agents = (await client.get("/api/v1/agents")).json()["agents"]
                return len(agents[1]["tools"]) == 5

            await eventually(listed, within=10)
        finally:
            away.stop()


async def test_a_tool_name_offered_twice_refuses_the_start(tmp_path: Path, record: Path) -> None:
    config = write_config(tmp_path, {"one": stdio_entry(record), "two": stdio_entry(record)})
    with pytest.raises(ToolNameClash, match="'one' and 'two' both offer a tool named 'add'"):
        await MCPTools(load_config(config)).run()
    prefixed = write_config(tmp_path, {"one": stdio_entry(record), "two": stdio_entry(record, "--prefix", "b_")})
    async with running(MCPTools(load_config(prefixed))) as tools:
        assert len(await tools.list_tools()) == 10
        assert await tools.call_tool("b_add", {"a": 1, "b": 2}) == "3.0"


def test_uvicorn_refuses_a_name_clash_in_one_line(tmp_path: Path, record: Path) -> None:
    config = write_config(tmp_path, {"one": stdio_entry(record), "two": stdio_entry(record)})
    env = {
        "PATH": "/usr/bin:/bin",
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "PARLEY_MCP_CONFIG": config,
    }
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # One line, and the exit status that stops uvicorn's --workers supervisor (as a bad setting does).
    assert done.returncode == 3, done.stderr
    assert "parley: the MCP servers 'one' and 'two' both offer a tool named 'add'" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "is not valid JSON"),
        ("[]", '"mcpServers" object'),
        ('{"mcpServers": {"x": {}}}', 'needs a "command" (stdio) or an http(s) "url"'),
        ('{"mcpServers": {"x": {"command": "y", "args": "z"}}}', '"args" must be a list of strings'),
        ('{"mcpServers": {"x": {"url": "ftp://x"}}}', 'needs a "command"'),
    ],
)
def test_a_config_parley_cannot_use_is_one_clear_line(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(SettingsError, match="PARLEY_MCP_CONFIG") as raised:
        create_app(make_settings(tmp_path, openai_base_url="http://127.0.0.1:9/v1", mcp_config=str(path)))
    assert problem in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(SettingsError, match="cannot be read"):
        load_config(tmp_path / "missing.json")


async def test_mounted_without_its_lifespan_a_call_opens_a_connection_of_its_own(
    tmp_path: Path, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "add", "arguments": {"a": 20, "b": 22}}]]
    config = write_config(tmp_path, {"example": stdio_entry(record)})
    app = create_app(
        make_settings(tmp_path, agent="openai", openai_base_url=stub_url, openai_model="tools", mcp_config=config)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://parley") as client:
        agents = (await client.get("/api/v1/agents")).json()["agents"]
        assert [t["name"] for t in agents[1]["tools"]] == ["add", "now", "slow", "fail", "die"]
        session_id = await new_session(client)
        answer = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "add"})
        assert answer.text == "Done."
    assert stub.calls[-1].body["messages"][-1] == {"role": "tool", "tool_call_id": "call_0_0", "content": "42.0"}
    await app.state.parley.close()


async def test_a_host_hands_in_an_mcp_server_in_process(
    serve: Callable[..., LiveServer], tmp_path: Path, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "add", "arguments": {"a": 1, "b": 2}}]]
    tools = MCPTools({"mine": make_server(record_to=str(record))})
    agents = Agents([EchoAgent(), OpenAIAgent(stub_url, "tools", tools=tools)], default="openai")
    server = serve(create_app(make_settings(tmp_path), agents=agents))
    async with server.client() as client:
        listed = (await client.get("/api/v1/agents")).json()["agents"]
        assert [len(a["tools"]) for a in listed] == [0, 5]
        session_id = await new_session(client)
        answer = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "add"})
        assert answer.text == "Done."
    assert stub.calls[-1].body["messages"][-1]["content"] == "3.0"


async def test_a_client_that_goes_away_stops_the_tool(
    serve: Callable[..., LiveServer], tmp_path: Path, record: Path, stub: OpenAIStub, stub_url: str
) -> None:
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 60, "tag": "gone"}}]]
    config = write_config(tmp_path, {"example": stdio_entry(record)})
    settings = make_settings(
        tmp_path, agent="openai", openai_base_url=stub_url, openai_model="tools", mcp_config=config
    )
    server = serve(create_app(settings))
    async with server.client() as client:
        session_id = await new_session(client)
        async with anyio.create_task_group() as task_group:

            async def chat() -> None:
                await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "wait"})

            task_group.start_soon(chat)

            async def started() -> bool:
                return bool(records(record, "started"))

            await eventually(started, within=20)
            left_at = time.time()
            task_group.cancel_scope.cancel()  # (the request's connection is closed: PARLEY_ON_DISCONNECT is cancel)

        async def seen() -> bool:
            return bool(records(record, "cancelled"))

        await eventually(seen, within=2)
        assert records(record, "cancelled")[0]["at"] - left_at < 1.0

        async def recorded() -> bool:
            return (await messages(client, session_id))[-1]["status"] == "disconnected"

        await eventually(recorded)


async def test_an_http_server_that_wants_headers_gets_them(
    serve: Callable[..., LiveServer], tmp_path: Path, record: Path
) -> None:
    mcp_app = make_server(record_to=str(record)).streamable_http_app()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"authorization", b"Bearer mcp-secret") not in scope["headers"]:
            await PlainTextResponse("no", status_code=401)(scope, receive, send)
            return
        await mcp_app(scope, receive, send)

    url = serve(guarded).url + "/mcp"
    entry = {"url": url, "headers": {"Authorization": "Bearer mcp-secret"}}
    async with running(MCPTools(load_config(write_config(tmp_path, {"guarded": entry})))) as tools:
        assert await tools.call_tool("add", {"a": 1, "b": 2}) == "3.0"
    async with running(MCPTools(load_config(write_config(tmp_path, {"bare": {"url": url}})))) as tools:
        assert await tools.list_tools() == []  # (refused: it is reported, and tried again later)
    assert "mcp-secret" not in repr(load_config(write_config(tmp_path, {"guarded": entry})))
