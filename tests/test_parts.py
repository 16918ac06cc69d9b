"""A reply that acts (reasoning, a tool call, usage): its parts in history, on the wire (SSE frames every event,
plain text only the text), through a cancel inside the tool, a rejoin, a kill -9, and two workers on Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import ASGIApp

from parley.agents.events import Reasoning, Step, ToolCall, ToolError, ToolInputDelta, ToolInputStart, ToolResult, Usage
from parley.app import create_app
from parley.sessions import parts
from parley.ui_messages import Framer
from tests import acting
from tests.conftest import LiveServer, RedisServer, Subprocess, eventually, make_settings, messages, new_session
from tests.test_chat_sse import SSE, parse_sse

pytestmark = pytest.mark.anyio


def chunks(body: str, interaction_id: str) -> list[dict[str, Any]]:
    """The parts of an SSE body, after checking that every frame has the next id and it ends in [DONE]."""
    events = [event for event in parse_sse(body) if not event[1].startswith(":")]
    assert events[-1] == (None, "[DONE]")
    assert [event_id for event_id, _ in events[:-1]] == [f"{interaction_id}:{seq}" for seq in range(len(events) - 1)]
    return [json.loads(data) for _, data in events[:-1]]


def test_events_fold_into_the_parts_use_chat_keeps() -> None:
    events: list[Any] = [
        Step(),
        Reasoning("a"),
        Reasoning("b"),
        "x",
        Usage(1, 1, 2),
        "y",
        ToolInputStart("c1", "t"),
        ToolInputDelta("c1", '{"q":'),
        ToolInputDelta("c1", "1}"),
        ToolCall("c1", "t", {"q": 1}),
        ToolError("c1", "boom"),
        ToolInputStart("c2", "t"),
        ToolInputDelta("c2", '{"q": 2'),
        Reasoning("c"),
    ]
    assert parts.fold(events) == [
        {"type": "step-start"},
        {"type": "reasoning", "id": "reasoning-0", "text": "ab", "state": "done"},
        {"type": "text", "text": "xy", "state": "done"},  # usage is no part and ends no run
        {"type": "dynamic-tool", "toolName": "t", "toolCallId": "c1", "state": "output-error", "input": {"q": 1}}
        | {"errorText": "boom"},
        {"type": "dynamic-tool", "toolName": "t", "toolCallId": "c2", "state": "input-streaming"},
        {"type": "reasoning", "id": "reasoning-1", "text": "c", "state": "done"},
    ]
    content, folded, usage = parts.split(events)
    assert (content, folded, usage) == (
        "xy",
        parts.fold(events),
        {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    )
    assert parts.split(["a", "b"]) == ("ab", None, None)  # text alone: its parts are implied
    # The runner closes the calls left open: c2's input never completed (it keeps what the model sent).
    closing = parts.unfinished_calls(events, "cancelled")
    assert closing[0] == ToolCall("c2", "t", '{"q": 2')
    assert isinstance(closing[1], ToolError) and closing[1].error.startswith("Cancelled")
    assert parts.fold(events + closing)[4]["state"] == "output-error"
    assert all(parts.decode(parts.encode(event)) == event for event in events if not isinstance(event, str))


def test_the_sse_framer_opens_and_closes_parts_as_history_folds_them() -> None:
    framer, seq, kinds = Framer(), 1, []
    for event in [Step(), Reasoning("a"), "x", ToolCall("c1", "t", {}), ToolResult("c1", 1), Step(), "y"]:
        frames = framer.frames("int_1", seq, event)
        seq += len(frames)
        kinds += [json.loads(frame.decode().split("data: ", 1)[1])["type"] for frame in frames]
    assert kinds == [
        "start-step",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
    ]


@pytest.fixture
def acting_server(serve: Callable[[ASGIApp], LiveServer], tmp_path: Path) -> Callable[..., LiveServer]:
    """A parley whose default agent is tests/acting.py's (``server.agent``)."""

    def start(delay: float = 0.0, **overrides: Any) -> LiveServer:
        settings = make_settings(tmp_path, agent="acting", checkpoint_seconds=0.1, **overrides)
        agents = acting.agents(delay)
        server = serve(create_app(settings, agents=agents))
        server.agent = agents["acting"]  # type: ignore[attr-defined]
        return server

    return start


async def test_sse_streams_reasoning_and_a_tool_call_and_history_keeps_the_parts(
    acting_server: Callable[..., LiveServer],
) -> None:
    server = acting_server()
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "2+3?"}, headers=SSE)
        assert response.status_code == 200
        sent = chunks(response.text, response.headers["x-interaction-id"])
        history = await messages(client, session_id)
        plain = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "again"})
        again = await messages(client, session_id)
    assert [chunk["type"] for chunk in sent] == [
        "start",
        "start-step",
        "reasoning-start",
        *["reasoning-delta"] * 3,
        "reasoning-end",
        "text-start",
        *["text-delta"] * 2,
        "text-end",
        "tool-input-start",
        *["tool-input-delta"] * 2,
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        *["text-delta"] * 3,
        "text-end",
        "finish-step",
        "finish",
    ]
    assert {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "add", "dynamic": True} in sent
    available = {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "add", "input": acting.INPUT}
    assert available | {"dynamic": True} in sent
    assert {"type": "tool-output-available", "toolCallId": "call_1", "output": acting.OUTPUT, "dynamic": True} in sent
    assert sent[-1] == {
        "type": "finish",
        "finishReason": "stop",
        "messageMetadata": {"status": "complete", "usage": acting.USAGE},
    }
    user, reply = history[-2:]
    assert user["parts"] == [{"type": "text", "text": "2+3?"}] and user["usage"] is None
    assert (reply["content"], reply["parts"], reply["usage"], reply["status"]) == (
        acting.TEXT,
        acting.PARTS,
        acting.USAGE,
        "complete",
    )
    # Plain text is the text alone, byte for byte what history's content is.
    assert plain.status_code == 200 and plain.text == again[-1]["content"] == acting.TEXT
    assert again[-1]["parts"] == acting.PARTS


async def test_a_cancel_inside_the_tool_records_the_call_failed_and_says_so_before_finish(
    acting_server: Callable[..., LiveServer],
) -> None:
    server = acting_server()
    async with server.client() as client:
        session_id = await new_session(client)
        body: dict[str, str] = {}

        async def chat() -> None:
            response = await client.post(
                "/api/v1/chat", data={"ui_session_id": session_id, "message": "slow sum"}, headers=SSE
            )
            body["text"], body["id"] = response.text, response.headers["x-interaction-id"]

        async def tool_running() -> bool:
            history = await messages(client, session_id)
            return bool(history) and any(part.get("state") == "input-available" for part in history[-1]["parts"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)
            await eventually(tool_running)  # (saved at the call: a tool may run long)
            # A rejoin mid-tool replays every part so far, then follows to the end.
            async with client.stream("GET", f"/api/v1/chat/{session_id}/stream", headers=SSE) as rejoin:
                # And one from a Last-Event-ID in the middle of the reasoning: the frames after it, exactly.
                interaction_id = rejoin.headers["x-interaction-id"]
                after = {**SSE, "last-event-id": f"{interaction_id}:4"}
                async with client.stream("GET", f"/api/v1/chat/{session_id}/stream", headers=after) as resumed:
                    answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
                    rejoined = (await rejoin.aread()).decode()
                    rest = (await resumed.aread()).decode()
        history = await messages(client, session_id)
        next_reply = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "sum"})
    assert answer.json()["cancelled"] is True
    sent = chunks(body["text"], body["id"])
    kinds = [chunk["type"] for chunk in sent]
    assert kinds[-3:] == ["tool-output-error", "finish-step", "finish"]
    error = sent[-3]
    assert error["toolCallId"] == "call_1" and error["errorText"].startswith("Cancelled")
    assert sent[-1]["finishReason"] == "other" and sent[-1]["messageMetadata"] == {"status": "cancelled"}
    assert rejoined == body["text"]  # frame for frame as it was first sent
    assert rest == body["text"][body["text"].index(f"id: {body['id']}:5\n") :]
    reply = history[-1]
    tool = {**acting.PARTS[3], "state": "output-error", "errorText": error["errorText"]}
    del tool["output"]
    assert (reply["status"], reply["parts"], reply["content"], reply["usage"]) == (
        "cancelled",
        [*acting.PARTS[:3], tool],
        "".join(acting.BEFORE_TOOL),
        None,  # the model call that would have reported usage never ended
    )
    assert next_reply.text == acting.TEXT  # the session goes on
    assert server.agent.tool_runs == ["cancelled", "finished"]  # type: ignore[attr-defined]


async def test_a_disconnect_inside_the_tool_under_plain_text_closes_the_call(
    acting_server: Callable[..., LiveServer],
) -> None:
    server = acting_server()
    async with server.client() as client:
        session_id = await new_session(client)
        async with anyio.create_task_group() as tg:

            async def chat() -> None:
                async with server.client() as other:
                    async with other.stream(
                        "POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "slow"}
                    ) as response:
                        async for text in response.aiter_text():
                            if "add." in text:
                                break  # leaves while the tool runs

            async def ended() -> bool:
                history = await messages(client, session_id)
                return bool(history) and history[-1]["status"] != "streaming"

            tg.start_soon(chat)
            await eventually(ended)
        reply = (await messages(client, session_id))[-1]
    assert reply["status"] == "disconnected"
    assert reply["parts"][-1]["state"] == "output-error" and "client went away" in reply["parts"][-1]["errorText"]


async def test_a_killed_process_leaves_every_part_so_far(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_CHECKPOINT_SECONDS": "0.1"}
    server = subprocesses(env, app="tests.acting:app").start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        session_id = await new_session(client)
        async with client.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": "slow"}) as r:

            async def tool_running() -> bool:
                history = await messages(client, session_id)
                return bool(history) and any(part.get("state") == "input-available" for part in history[-1]["parts"])

            await eventually(tool_running)
            server.stop(kill=True)  # while the tool runs and its client is still connected
            del r
    restarted = subprocesses(env, app="tests.acting:app").start()
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as client:
        reply = (await messages(client, session_id))[-1]
    assert reply["status"] == "interrupted"
    assert reply["parts"][:3] == acting.PARTS[:3]
    assert reply["parts"][3]["state"] == "input-available" and reply["parts"][3]["input"] == acting.INPUT


@pytest.mark.redis
async def test_a_rejoin_on_another_worker_replays_every_part(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ACTING_DELAY": "0.05"}
    a = subprocesses(env, app="tests.acting:app").start()
    b = subprocesses(env, app="tests.acting:app").start()
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=10) as first,
        httpx.AsyncClient(base_url=b.url, timeout=10) as second,
    ):
        session_id = await new_session(first)
        body: dict[str, str] = {}

        async def chat() -> None:
            response = await first.post(
                "/api/v1/chat", data={"ui_session_id": session_id, "message": "slow"}, headers=SSE
            )
            body["text"], body["id"] = response.text, response.headers["x-interaction-id"]

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)

            async def running() -> bool:
                history = await messages(second, session_id)
                return bool(history) and history[-1]["status"] == "streaming"

            await eventually(running)
            async with second.stream("GET", f"/api/v1/chat/{session_id}/stream", headers=SSE) as rejoin:
                assert rejoin.status_code == 200, await rejoin.aread()
                seen, texts = "", rejoin.aiter_text()
                async for text in texts:
                    seen += text
                    if '"tool-input-available"' in seen:
                        break
                answer = await second.post("/api/v1/cancel", data={"ui_session_id": session_id})
                async for text in texts:
                    seen += text
    assert answer.json()["cancelled"] is True
    assert seen == body["text"]  # every part, through the mirror, frame for frame
    assert '"tool-output-error"' in seen


async def test_a_cancel_inside_an_mcp_tool_is_answered_in_history_and_the_model_sees_it_next_turn(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path
) -> None:
    from tests.mcp_server import read_records
    from tests.openai_stub import OpenAIStub
    from tests.test_mcp import stdio_entry, write_config

    record = tmp_path / "record.jsonl"
    stub = OpenAIStub(tokens=["Done."], delay=0.001, reasoning=["Let me wait."])
    stub.tool_plan = [[{"name": "slow", "arguments": {"seconds": 60, "tag": "parts"}}]]
    config = write_config(tmp_path, {"example": stdio_entry(record)})
    stub_url = serve(stub).url + "/v1"  # type: ignore[arg-type]
    settings = make_settings(
        tmp_path, agent="openai", openai_base_url=stub_url, openai_model="tools", mcp_config=config
    )
    server = serve(create_app(settings))
    async with server.client() as client:
        session_id = await new_session(client)
        body: dict[str, str] = {}

        async def chat() -> None:
            response = await client.post(
                "/api/v1/chat", data={"ui_session_id": session_id, "message": "wait"}, headers=SSE
            )
            body["text"], body["id"] = response.text, response.headers["x-interaction-id"]

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)

            async def started() -> bool:
                return any(r["event"] == "started" for r in read_records(record))

            await eventually(started, within=20)
            assert (await client.post("/api/v1/cancel", data={"ui_session_id": session_id})).json()["cancelled"]
        reply = (await messages(client, session_id))[-1]
        stub.tool_plan = []
        again = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "again"})
    sent = chunks(body["text"], body["id"])
    assert [c["type"] for c in sent][-3:] == ["tool-output-error", "finish-step", "finish"]
    tool = reply["parts"][-1]
    assert reply["status"] == "cancelled" and reply["parts"][1]["type"] == "reasoning"
    assert (tool["toolName"], tool["state"], tool["input"]) == ("slow", "output-error", {"seconds": 60, "tag": "parts"})
    assert tool["errorText"] == sent[-3]["errorText"] and tool["errorText"].startswith("Cancelled")
    # The next turn: the model is given the cancelled call, answered with what history says, and accepts it.
    assert again.status_code == 200 and again.text == "Done." and stub.calls[-1].refused is None
    conversation = stub.calls[-1].body["messages"]
    (asked,) = [m for m in conversation if m.get("tool_calls")]
    (answered,) = [m for m in conversation if m.get("role") == "tool"]
    assert answered["tool_call_id"] == asked["tool_calls"][0]["id"] and "Cancelled" in answered["content"]
