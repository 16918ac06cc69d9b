"""The ``openai`` agent as an agent that acts: reasoning, usage, and the tool-call loop, against the real stub model
server on a loopback port and the real MCP example server (tests/mcp_server.py) served in process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from parley.agents import HistoryEntry, OpenAIAgent, Turn
from parley.agents.events import (
    Event,
    Reasoning,
    Step,
    ToolCall,
    ToolError,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    Usage,
)
from parley.agents.mcp import MCPTools
from parley.settings import Settings, SettingsError
from tests.conftest import LiveServer
from tests.mcp_server import make_server, read_records
from tests.openai_stub import OpenAIStub, invalid_conversation

pytestmark = pytest.mark.anyio


@pytest.fixture
def stub() -> OpenAIStub:
    return OpenAIStub(tokens=["The ", "answer."], delay=0.001)


@pytest.fixture
def stub_url(serve: Callable[..., LiveServer], stub: OpenAIStub) -> str:
    return serve(stub).url + "/v1"


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "mcp-record.jsonl"


def agent(stub_url: str, record: Path | None = None, model: str = "tools", **kw: Any) -> OpenAIAgent:
    tools = MCPTools({"example": make_server(record_to=str(record) if record else None)})
    return OpenAIAgent(stub_url, model, tools=tools, **kw)


async def reply(agent: OpenAIAgent, message: str = "go", history: list[HistoryEntry] | None = None) -> list[Event]:
    try:
        return [event async for event in agent.reply(Turn("s1", message, history or []))]
    finally:
        await agent.aclose()


def text(events: list[Event]) -> str:
    return "".join(e for e in events if isinstance(e, str))


def test_the_stub_speaks_the_real_protocol_with_reasoning_tools_and_usage(stub: OpenAIStub, stub_url: str) -> None:
    stub.reasoning, stub.reasoning_field = ["Let me ", "think."], "reasoning"
    stub.tool_plan = [[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]]
    stub.fragments = "together"
    client = openai.OpenAI(base_url=stub_url, api_key="sk-anything")
    stream = client.chat.completions.create(
        model="tools",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, calls, usage = "", {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning") or ""
        for fragment in delta.tool_calls or []:
            call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += fragment.id or ""
            call["name"] += (fragment.function and fragment.function.name) or ""
            call["arguments"] += (fragment.function and fragment.function.arguments) or ""
    client.close()
    assert reasoning == "Let me think."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("add", {"a": 1, "b": 2}),
        ("add", {"a": 3, "b": 4}),
    ]
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 2


def test_the_stub_refuses_what_a_real_server_refuses() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    user = {"role": "user", "content": "hi"}
    assert invalid_conversation([user, {"role": "assistant", "content": None, "tool_calls": [call]}, user])
    assert invalid_conversation([user, {"role": "tool", "tool_call_id": "c1", "content": "3"}])
    bad = {**call, "function": {"name": "add", "arguments": "{oops"}}
    assert invalid_conversation(
        [user, {"role": "assistant", "tool_calls": [bad]}, {"role": "tool", "tool_call_id": "c1", "content": ""}]
    )
    answered = [
        user,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": ""},
    ]
    assert invalid_conversation(answered) is None
    assert invalid_conversation(answered, deepseek=True)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_under_either_name_and_usage(stub: OpenAIStub, stub_url: str, field: str) -> None:
    stub.reasoning, stub.reasoning_field = ["Think", "ing."], field
    events = await reply(OpenAIAgent(stub_url, "tokens"))
    assert events[0] == Step()
    assert [e.text for e in events if isinstance(e, Reasoning)] == ["Think", "ing."]
    assert text(events) == "The answer."
    (usage,) = [e for e in events if isinstance(e, Usage)]
    assert usage.reasoning_tokens == 2 and usage.cached_input_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens > 0
    assert stub.calls[0].body["stream_options"] == {"include_usage": True}
    assert "tools" not in stub.calls[0].body  # (no toolbox, no tools)


async def test_a_server_that_refuses_stream_options_is_asked_without_them(stub: OpenAIStub, stub_url: str) -> None:
    stub.knows_stream_options = False
    model = OpenAIAgent(stub_url, "tokens")
    for _ in range(2):
        events = await reply(model)
        assert text(events) == "The answer."
        assert not [e for e in events if isinstance(e, Usage)]  # (unknown: the server was not asked)
    assert ["stream_options" in call.body for call in stub.calls] == [True, False, False]


@pytest.mark.parametrize("fragments", ["index", "late-name", "whole", "together", "no-index"])
async def test_tool_calls_however_the_server_cuts_them(stub: OpenAIStub, stub_url: str, fragments: str) -> None:
    stub.fragments = fragments
    stub.tool_plan = [[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 10, "b": 5}}]]
    events = await reply(agent(stub_url))
    starts = [e for e in events if isinstance(e, ToolInputStart)]
    assert [s.name for s in starts] == ["add", "add"]
    ids = [s.call_id for s in starts]
    assert len(set(ids)) == 2
    for call_id, expected in zip(ids, ({"a": 1, "b": 2}, {"a": 10, "b": 5}), strict=True):
        streamed = "".join(e.delta for e in events if isinstance(e, ToolInputDelta) and e.call_id == call_id)
        assert json.loads(streamed) == expected
        assert ToolCall(call_id, "add", expected) in events
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.call_id, r.output) for r in results] == [(ids[0], "3.0"), (ids[1], "15.0")]
    # Each call's events come in order: its start before its deltas, its input before its result.
    for call_id in ids:
        kinds = [type(e).__name__ for e in events if getattr(e, "call_id", None) == call_id]
        assert kinds[0] == "ToolInputStart" and kinds[-2:] == ["ToolCall", "ToolResult"]
    assert [e for e in events if isinstance(e, Step)] == [Step(), Step()]
    assert text(events) == "The answer."
    assert len([e for e in events if isinstance(e, Usage)]) == 2
    first, second = stub.calls
    assert [t["function"]["name"] for t in first.body["tools"]] == ["add", "now", "slow", "fail", "die"]
    assert second.refused is None
    assistant, *answers = second.body["messages"][-3:]
    assert [c["id"] for c in assistant["tool_calls"]] == ids
    assert [(a["tool_call_id"], a["content"]) for a in answers] == [(ids[0], "3.0"), (ids[1], "15.0")]


async def test_a_failing_tool_and_bad_arguments_go_back_to_the_model(stub: OpenAIStub, stub_url: str) -> None:
    stub.tool_plan = [
        [
            {"name": "fail", "arguments": {"message": "no such city"}},
            {"name": "add", "arguments": '{"a": 1, "b":'},
            {"name": "add", "arguments": "[1, 2]"},
            {"name": "nope", "arguments": {}},
        ]
    ]
    events = await reply(agent(stub_url))
    errors = [e.error for e in events if isinstance(e, ToolError)]
    assert len(errors) == 4
    assert "no such city" in errors[0]
    assert "not valid JSON" in errors[1]
    assert "must be a JSON object" in errors[2]
    assert "no tool named 'nope'" in errors[3]
    assert [c.input for c in events if isinstance(c, ToolCall)][1] == '{"a": 1, "b":'  # (the text the model sent)
    assert text(events) == "The answer."
    second = stub.calls[1]
    assert second.refused is None  # the bad arguments went back as {}, which a server can parse
    tool_messages = [m for m in second.body["messages"] if m["role"] == "tool"]
    assert all(m["content"].startswith("Error: ") for m in tool_messages)


async def test_max_steps_bounds_the_model_calls(stub: OpenAIStub, stub_url: str) -> None:
    stub.tool_plan = [[{"name": "add", "arguments": {"a": i, "b": 1}}] for i in range(5)]
    events = await reply(agent(stub_url, max_steps=3))
    assert len(stub.calls) == 3
    assert [c.body.get("tool_choice") for c in stub.calls] == [None, None, "none"]
    outcomes = [e for e in events if isinstance(e, ToolResult | ToolError)]
    assert [type(o) for o in outcomes] == [ToolResult, ToolResult, ToolError]
    assert isinstance(outcomes[-1], ToolError) and "PARLEY_MAX_STEPS" in outcomes[-1].error


async def test_a_tool_that_takes_too_long_is_stopped_and_the_model_told(
    stub: OpenAIStub, stub_url: str, record: Path
) -> None:
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 30, "tag": "t"}}]]
    events = await reply(agent(stub_url, record, tool_timeout=0.3))
    (error,) = [e for e in events if isinstance(e, ToolError)]
    assert "did not finish within 0.3 s" in error.error
    assert text(events) == "The answer."
    assert [r["event"] for r in read_records(record)] == ["started", "cancelled"]


async def test_history_parts_become_the_conversation_the_model_made(stub: OpenAIStub, stub_url: str) -> None:
    stub.deepseek = True  # (refuses a tool-call turn without its reasoning_content)
    stub.reasoning = ["Adding again."]
    stub.tool_plan = [[{"name": "add", "arguments": {"a": 1, "b": 1}}]]
    call = {"type": "dynamic-tool", "toolName": "add", "input": {"a": 1, "b": 2}}
    parts = [
        {"type": "step-start"},
        {"type": "reasoning", "text": "I should add.", "state": "done"},
        {**call, "toolCallId": "c1", "state": "output-available", "output": "3.0"},
        {**call, "toolCallId": "c2", "state": "output-error", "errorText": "The reply was cancelled."},
        {**call, "toolCallId": "c3", "state": "input-available"},
        {"type": "step-start"},
        {"type": "text", "text": "Three.", "state": "done"},
    ]
    history = [HistoryEntry("user", "add"), HistoryEntry("assistant", "Three.", parts), HistoryEntry("user", "more")]
    history.append(HistoryEntry("assistant", "plain", ()))
    events = await reply(agent(stub_url), "again", history)
    assert text(events) == "The answer."
    first = stub.calls[0]
    assert first.refused is None and stub.calls[1].refused is None
    messages = first.body["messages"]
    assert messages[0] == {"role": "user", "content": "add"}
    assert messages[1]["reasoning_content"] == "I should add."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2", "c3"]
    assert [c["function"]["arguments"] for c in messages[1]["tool_calls"]] == ['{"a": 1, "b": 2}'] * 3
    assert [m["content"] for m in messages[2:5]] == [
        "3.0",
        "Error: The reply was cancelled.",
        "Error: the call was cancelled before it returned.",
    ]
    assert messages[5:] == [
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "plain"},
        {"role": "user", "content": "again"},
    ]


def test_the_settings_of_tools() -> None:
    defaults = Settings.from_env({})
    assert (defaults.max_steps, defaults.tool_timeout_seconds, defaults.mcp_config) == (8, 60.0, None)
    chosen = Settings.from_env(
        {"PARLEY_MAX_STEPS": "3", "PARLEY_TOOL_TIMEOUT_SECONDS": "2.5", "PARLEY_MCP_CONFIG": "/etc/parley/mcp.json"}
    )
    assert (chosen.max_steps, chosen.tool_timeout_seconds, chosen.mcp_config) == (3, 2.5, "/etc/parley/mcp.json")
    for name, value in [("MAX_STEPS", "0"), ("MAX_STEPS", "1.5"), ("TOOL_TIMEOUT_SECONDS", "0")]:
        with pytest.raises(SettingsError, match=f"PARLEY_{name}"):
            Settings.from_env({f"PARLEY_{name}": value})
