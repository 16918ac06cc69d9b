"""Vercel's AI SDK as a client nobody here wrote: its ``AbstractChat`` (what React's ``useChat`` wraps) over its
``DefaultChatTransport``, run by Node (tests/ai-sdk/driver.mjs) against a real uvicorn. What it shows must be
what history says."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.types import ASGIApp

from parley.agents import AgentError, Agents, Turn
from parley.app import create_app
from tests.conftest import (
    AISDK,
    LiveServer,
    RedisServer,
    Subprocess,
    eventually,
    make_settings,
    messages,
    new_session,
    start_together,
)

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(200))


def assistant_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    replies = [m for m in history if m["role"] == "assistant"]
    assert len(replies) == 1, history
    return replies[0]


async def test_a_sent_message_shows_the_text_that_history_keeps(live: Callable[..., LiveServer], ai_sdk: AISDK) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", " héllo  wörld\n  ✓ two lines ")
        history = await messages(client, session_id)

    assert result["error"] is None and result["status"] == "ready" and not result["timedOut"], result
    assert result["finish"] == {"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "stop"}
    reply = assistant_of(history)
    assert reply["status"] == "complete"
    assert result["assistant"]["text"] == reply["content"] == " héllo  wörld\n  ✓ two lines "
    # The client's message is history's: the same id, and the metadata parley sent at start and finish, merged.
    assert result["assistant"]["id"] == reply["id"]
    assert result["assistant"]["metadata"] == {
        "ui_session_id": session_id,
        "interaction_id": reply["interaction_id"],
        "status": "complete",
    }


async def test_a_conversation_of_several_turns_sends_the_whole_chat_and_answers_the_last(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", "first", "--text", "second one")
        history = await messages(client, session_id)

    assert result["error"] is None and result["status"] == "ready", result
    # The second request carries the first reply (with its metadata) in `messages`: parley answers the last user one.
    assert [(m["role"], m["text"]) for m in result["messages"]] == [
        ("user", "first"),
        ("assistant", "first"),
        ("user", "second one"),
        ("assistant", "second one"),
    ]
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "first", "complete"),
        ("assistant", "first", "complete"),
        ("user", "second one", "complete"),
        ("assistant", "second one", "complete"),
    ]
    assert [m["id"] for m in result["messages"] if m["role"] == "assistant"] == [
        m["id"] for m in history if m["role"] == "assistant"
    ]


def shown(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(m["id"], m["role"], m["text"]) for m in result["messages"]]


def kept(history: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(m["id"], m["role"], m["content"]) for m in history]


async def test_regenerate_replaces_the_last_reply_in_history_as_on_the_screen(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", "the question", "--regenerate")
        history = await messages(client, session_id)

    assert result["error"] is None and result["status"] == "ready", result
    # The SDK dropped the old reply and shows the new one after the same question: so does history.
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "the question", "complete"),
        ("assistant", "the question", "complete"),
    ]
    assert shown(result) == kept(history)
    # The reply is the second interaction's; the question stays the first's.
    assert history[0]["interaction_id"] != history[1]["interaction_id"]
    assert result["assistant"]["metadata"]["interaction_id"] == history[1]["interaction_id"]


async def test_send_regenerate_edit_and_reload_keep_history_equal_to_the_chat(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    server = live()
    steps = [
        {"send": "one"},
        {"send": "two"},
        {"send": "three"},
        {"regenerate": None},  # the last reply, again
        {"regenerate": 1},  # the first reply (by its id): what followed it goes too
        {"send": "four"},
        {"edit": 2, "text": "four, edited"},  # sendMessage({text, messageId}): the user message, in place
        {"send": "five"},
        {"edit": 0, "text": "one, edited"},  # the first message: all after it goes
        {"send": "six"},
        {"regenerate": 2},  # a user message (the SDK keeps it and asks again)
    ]
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--steps", json.dumps(steps))
        history = await messages(client, session_id)
        reloaded = await ai_sdk.run("resume", server.url, session_id, "--hydrate")
        title = (await client.get(f"/api/v1/sessions/{session_id}")).json()["title"]

    assert result["error"] is None and result["status"] == "ready", result
    assert [(role, text) for _, role, text in shown(result)] == [
        ("user", "one, edited"),
        ("assistant", "one, edited"),
        ("user", "six"),
        ("assistant", "six"),
    ]
    # The same messages, ids included (the SDK's own for its user messages, start.messageId for the replies).
    assert shown(result) == kept(history)
    assert all(m["status"] == "complete" for m in history)
    assert [(m["id"], m["role"], m["text"]) for m in reloaded["messages"]] == kept(history)
    assert title == "one, edited"


async def test_an_edit_or_regenerate_of_a_message_parley_never_had_is_a_404_and_drops_nothing(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        await ai_sdk.run("send", server.url, session_id, "--text", "kept")
        before = await messages(client, session_id)
        body = {
            "id": session_id,
            "trigger": "regenerate-message",
            "messageId": "msg_unknown",
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "kept"}]}],
        }
        response = await client.post("/api/v1/chat", json=body)
        assert response.status_code == 404 and response.json()["message"] == "Message not found: msg_unknown"
        response = await client.post("/api/v1/chat", json={**body, "trigger": "submit-message", "messageId": 7})
        assert response.status_code == 400
        assert await messages(client, session_id) == before


async def test_a_cancel_mid_reply_ends_the_message_as_cancelled(live: Callable[..., LiveServer], ai_sdk: AISDK) -> None:
    server = live(echo_delay=0.05)  # 200 words: ten seconds, and the cancel goes out at the first one
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", WORDS, "--cancel-after-chars", "1")
        history = await messages(client, session_id)

    # The app's stop button: POST /api/v1/cancel, while the SDK keeps reading the stream to its end.
    assert result["cancel"]["status"] == 200 and result["cancel"]["body"]["cancelled"] is True, result
    assert result["error"] is None and result["status"] == "ready" and not result["timedOut"], result
    # parley ends a cancelled reply with finishReason "other", which both majors accept (6 rejects "interrupted"),
    # and says how it ended in the metadata.
    assert result["finish"] == {"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "other"}
    reply = assistant_of(history)
    assert reply["status"] == "cancelled"
    assert result["assistant"]["metadata"]["status"] == "cancelled"
    text = result["assistant"]["text"]
    assert text == reply["content"]
    assert text.startswith(result["textAtCancel"]) and WORDS.startswith(text) and len(text) < len(WORDS)


async def test_the_sdks_own_stop_with_on_disconnect_continue_leaves_the_reply_running_to_resume(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    server = live(echo_delay=0.05)  # three seconds; the stop comes at the first word, the resume right after it
    async with server.client() as client:
        session_id = await new_session(client)
        # As the README's useChat example: body {on_disconnect: "continue"}, then stop() and resumeStream().
        args = ("--text", words, "--body", '{"on_disconnect": "continue"}', "--stop-after-chars", "1", "--then-resume")
        result = await ai_sdk.run("send", server.url, session_id, *args)
        history = await messages(client, session_id)

    stopped = result["stopped"]
    assert stopped["status"] == "ready" and stopped["finish"]["isAbort"] is True, result
    assert words.startswith(stopped["assistant"]["text"]) and stopped["assistant"]["text"] != words
    # Closing the connection did not stop the reply: the resumed stream has all of it, as history does.
    assert result["error"] is None and result["status"] == "ready" and not result["timedOut"], result
    assert result["finish"] == {"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "stop"}
    reply = assistant_of(history)
    assert (reply["status"], reply["content"]) == ("complete", words)
    assert result["assistant"]["text"] == words and result["assistant"]["metadata"]["status"] == "complete"
    assert [m["role"] for m in result["messages"]] == ["user", "assistant"]
    assert result["assistant"]["id"] == stopped["assistant"]["id"] == reply["id"]


class GatedAgent:
    """Says ``first``, then waits for the test to open the gate before it says ``rest``: the reply is surely
    still running while a client rejoins it."""

    name = "gated"
    description = "Says its first half, then waits for a gate."
    history_limit = 0

    def __init__(self, first: list[str], rest: list[str]) -> None:
        self.first = first
        self.rest = rest
        self.gate = threading.Event()  # set from the test's thread; the agent runs in the server's

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        for token in self.first:
            yield token
        with anyio.move_on_after(30):
            while not self.gate.is_set():
                await anyio.sleep(0.01)
        if not self.gate.is_set():
            raise AgentError("the test never opened the gate")
        for token in self.rest:
            yield token


async def test_resume_stream_rejoins_a_running_reply_from_its_start(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path, ai_sdk: AISDK
) -> None:
    agent = GatedAgent([f"a{i} " for i in range(20)], [f"b{i} " for i in range(20)])
    first, full = "".join(agent.first), "".join(agent.first + agent.rest)
    server = serve(create_app(make_settings(tmp_path, agent="gated"), agents=Agents([agent])))
    async with server.client() as client:
        session_id = await new_session(client)
        # Another client starts the reply, reads its first half and goes away; on_disconnect=continue keeps it going.
        form = {"ui_session_id": session_id, "message": "hi", "on_disconnect": "continue"}
        async with client.stream("POST", "/api/v1/chat", data=form, headers={"accept": "text/plain"}) as response:
            assert response.status_code == 200
            received = ""
            async for chunk in response.aiter_text():
                received += chunk
                if received == first:
                    break
        assert received == first

        seen: list[dict[str, Any]] = []

        def progress(state: dict[str, Any]) -> None:
            seen.append(state)
            if state["text"] == first:  # the replay has caught up with the paused reply: let it finish
                agent.gate.set()

        # A page reload: the app shows the history it has, then calls resumeStream() (useChat's resume: true).
        result = await ai_sdk.run("resume", server.url, session_id, "--hydrate", progress=progress)
        history = await messages(client, session_id)

    assert agent.gate.is_set(), seen  # the client had the first half while the reply was still running
    assert result["error"] is None and result["status"] == "ready" and not result["timedOut"], result
    assert result["finish"] == {"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "stop"}
    reply = assistant_of(history)
    assert reply["status"] == "complete" and reply["content"] == full
    # The replay rebuilt the message the page already showed (same id): one assistant message, with the whole text.
    assert [(m["role"], m["id"]) for m in result["messages"]] == [(m["role"], m["id"]) for m in history]
    assert result["assistant"]["text"] == full
    assert result["assistant"]["metadata"] == {
        "ui_session_id": session_id,
        "interaction_id": reply["interaction_id"],
        "status": "complete",
    }


@pytest.mark.redis
async def test_resume_stream_on_another_worker_follows_the_reply_and_a_cancel_there_stops_it(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer, ai_sdk: AISDK
) -> None:
    long = " ".join(f"w{i}" for i in range(400))  # twenty seconds at 50 ms a word: it runs while the SDK rejoins
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.05"}
    a, b = start_together(subprocesses(env), subprocesses(env))
    async with httpx.AsyncClient(timeout=20) as client:
        session_id = (await client.post(f"{a.url}/api/v1/sessions")).json()["ui_session_id"]
        # Another client starts the reply on worker a, reads a few words and goes away; the reply goes on.
        form = {"ui_session_id": session_id, "message": long, "on_disconnect": "continue"}
        received = ""
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=form) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 3:
                    break
        assert len(received.split()) >= 3

        # The page reloads and lands on worker b: resumeStream() there, then its stop button, also on b, once it
        # shows more than the first client saw.
        cancel_at = str(len(received) + 1)
        result = await ai_sdk.run("resume", b.url, session_id, "--hydrate", "--cancel-after-chars", cancel_at)
        history = (await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]

    assert result["cancel"]["status"] == 200 and result["cancel"]["body"]["cancelled"] is True, result
    assert result["error"] is None and result["status"] == "ready" and not result["timedOut"], result
    assert result["finish"]["finishReason"] == "other"
    reply = assistant_of(history)
    assert reply["status"] == "cancelled"
    assert result["assistant"]["metadata"]["status"] == "cancelled"
    assert result["assistant"]["id"] == reply["id"]
    text = result["assistant"]["text"]
    assert text == reply["content"]
    assert text.startswith(received) and len(text) > len(received) and long.startswith(text) and text != long


async def test_resume_stream_with_nothing_running_leaves_the_chat_as_it_was(
    live: Callable[..., LiveServer], ai_sdk: AISDK
) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "done already"})
        assert response.status_code == 200
        assert (await client.get(f"/api/v1/chat/{session_id}/stream")).status_code == 204
        result = await ai_sdk.run("resume", server.url, session_id, "--hydrate")

    # 204: nothing to resume; the SDK goes back to ready without an error and without touching the messages.
    assert result["error"] is None and result["status"] == "ready" and result["finish"] is None, result
    assert "streaming" not in result["statuses"]
    assert [(m["role"], m["text"], m["metadata"]["status"]) for m in result["messages"]] == [
        ("user", "done already", "complete"),
        ("assistant", "done already", "complete"),
    ]


async def test_history_loads_into_the_chat_as_it_comes_and_a_reply_that_ended_before_the_rejoin_ends_there_too(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path, ai_sdk: AISDK
) -> None:
    agent = GatedAgent(["first ", "half "], ["second ", "half"])
    # Checkpoints at every token: the paused reply's text so far is in the history at once.
    settings = make_settings(tmp_path, agent="gated", checkpoint_seconds=0)
    server = serve(create_app(settings, agents=Agents([agent])))
    async with server.client() as client:
        session_id = await new_session(client)
        form = {"ui_session_id": session_id, "message": "hi", "on_disconnect": "continue"}
        async with client.stream("POST", "/api/v1/chat", data=form, headers={"accept": "text/plain"}) as response:
            received = ""
            async for chunk in response.aiter_text():
                received += chunk
                if received == "first half ":
                    break

        loaded: list[dict[str, Any]] = []

        async def checkpointed() -> bool:
            loaded[:] = await messages(client, session_id)
            return bool(loaded[-1]["content"] == "first half ")

        # The page loads the history while the reply runs (its text so far, marked streaming) ...
        await eventually(checkpointed)
        assert loaded[-1]["metadata"]["status"] == "streaming"
        # ... and the reply ends before the page rejoins: the rejoin finds nothing running (204).
        agent.gate.set()
        await eventually(lambda: _ended(client, session_id))
        assert (await client.get(f"/api/v1/chat/{session_id}/stream")).status_code == 204
        result = await ai_sdk.run("resume", server.url, session_id, "--hydrate", "--history", json.dumps(loaded))
        history = await messages(client, session_id)

    # The history's messages went into the chat as they came (each is a UIMessage), and the README's recipe (load
    # the history again when the last message is still marked streaming) ends with the final text.
    assert [(m["id"], m["role"]) for m in result["hydrated"]] == [(m["id"], m["role"]) for m in loaded]
    assert result["error"] is None and result["status"] == "ready", result
    assert [(m["id"], m["role"], m["text"], m["metadata"]) for m in result["messages"]] == [
        (m["id"], m["role"], m["content"], m["metadata"]) for m in history
    ]
    assert result["assistant"]["text"] == "first half second half"
    assert result["assistant"]["metadata"]["status"] == "complete"


async def _ended(client: httpx.AsyncClient, session_id: str) -> bool:
    return bool((await messages(client, session_id))[-1]["status"] == "complete")


class FailingAgent:
    name = "failing"
    description = "Says three words, then fails."
    history_limit = 0

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        for word in ("one ", "two ", "three "):
            await anyio.lowlevel.checkpoint()
            yield word
        raise AgentError("The model fell over.")


async def test_an_agent_failure_mid_reply_is_an_error_the_sdk_shows_with_the_text_so_far(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path, ai_sdk: AISDK
) -> None:
    server = serve(create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent()])))
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", "hi")
        history = await messages(client, session_id)

    # SSE can say what went wrong after the first token: an `error` part puts the chat in status `error`.
    assert result["status"] == "error" and result["finish"]["isError"] is True, result
    assert "The model fell over." in result["error"]["message"]
    assert "The model fell over." in result["error"]["sentence"]
    reply = assistant_of(history)
    assert reply["status"] == "error"
    assert result["assistant"]["text"] == reply["content"] == "one two three "
    assert result["assistant"]["id"] == reply["id"]
    # The SDK applies nothing after an error part: the status reaches it in a message-metadata part sent before.
    assert result["assistant"]["metadata"]["status"] == "error"


async def test_an_unknown_session_is_an_error_the_sdk_shows(live: Callable[..., LiveServer], ai_sdk: AISDK) -> None:
    server = live()
    result = await ai_sdk.run("send", server.url, "ses_nobody", "--text", "hello")
    body = {
        "id": "ses_nobody",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}],
    }
    async with server.client() as client:
        direct = await client.post("/api/v1/chat", json={**body, "trigger": "submit-message"})
    assert direct.status_code == 404
    # The SDK turns a non-2xx answer into an error whose message is the body, and the chat's status into `error`
    # (7 adds the status code to it).
    assert result["status"] == "error", result
    assert result["error"]["message"] == direct.text
    if ai_sdk.package == "ai":
        assert result["error"]["statusCode"] == 404, result
    # The README's line that shows the sentence: JSON.parse(error.message).message.
    assert result["error"]["sentence"] == "Session not found: ses_nobody"


@pytest.fixture
def acting_parley(serve: Callable[[ASGIApp], LiveServer], tmp_path: Path) -> tuple[LiveServer, Any]:
    """A parley whose default agent reasons, calls a tool and answers (tests/acting.py), and that agent."""
    from tests import acting

    agents = acting.agents()
    return serve(create_app(make_settings(tmp_path, agent="acting"), agents=agents)), agents["acting"]


async def test_a_reply_with_reasoning_and_a_tool_call_streams_into_the_parts_history_keeps(
    acting_parley: tuple[LiveServer, Any], ai_sdk: AISDK
) -> None:
    from tests import acting

    server, _ = acting_parley
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", "what is 2 + 3?")
        history = await messages(client, session_id)
        # A new chat, built from history alone (as a page does on load), has the same parts.
        rebuilt = await ai_sdk.run("resume", server.url, session_id, "--hydrate")

    assert result["error"] is None and result["status"] == "ready", result
    assert result["finish"]["finishReason"] == "stop"
    reply = assistant_of(history)
    assert result["assistant"]["parts"] == reply["parts"] == acting.PARTS
    assert result["assistant"]["text"] == reply["content"] == acting.TEXT
    assert result["assistant"]["metadata"]["usage"] == reply["usage"] == acting.USAGE
    assert [m["parts"] for m in rebuilt["messages"]] == [m["parts"] for m in result["messages"]]
    assert [m["parts"] for m in rebuilt["messages"]] == [m["parts"] for m in history]


async def test_stop_during_a_tool_call_cancels_the_tool_and_history_answers_the_call(
    acting_parley: tuple[LiveServer, Any], ai_sdk: AISDK
) -> None:
    server, agent = acting_parley
    async with server.client() as client:
        session_id = await new_session(client)
        result = await ai_sdk.run("send", server.url, session_id, "--text", "slow sum", "--stop-at-tool")

        async def recorded() -> bool:
            return assistant_of(await messages(client, session_id))["status"] != "streaming"

        await eventually(recorded)
        reply = assistant_of(await messages(client, session_id))
        again = await ai_sdk.run("send", server.url, session_id, "--text", "sum")

    stopped = result["stopped"]["assistant"]["parts"]
    assert stopped[-1]["type"] == "dynamic-tool" and stopped[-1]["state"] == "input-available"
    assert reply["status"] == "disconnected"
    tool = reply["parts"][-1]
    assert (tool["toolCallId"], tool["state"]) == ("call_1", "output-error") and "Cancelled" in tool["errorText"]
    assert reply["parts"][:-1] == stopped[:-1]  # what the client saw, and the call answered
    assert agent.tool_runs[0] == "cancelled"
    assert again["error"] is None and again["finish"]["finishReason"] == "stop"  # the next message works


def digest(content: bytes) -> str:
    """A data: URL as the driver shows it: its bytes' sha256."""
    return f"data:sha256={hashlib.sha256(content).hexdigest()}"


async def test_files_sent_with_a_message_reach_the_agent_and_history_and_a_reload_shows_them(
    live: Callable[..., LiveServer], ai_sdk: AISDK, tmp_path: Path
) -> None:
    notes, pixel = b"# notes\nsome words\n", bytes(range(256)) * 3
    (tmp_path / "notes.md").write_bytes(notes)
    (tmp_path / "pixel.png").write_bytes(pixel)
    files = [
        {"path": str(tmp_path / "notes.md"), "mediaType": "text/markdown", "filename": "notes.md"},
        {"path": str(tmp_path / "pixel.png"), "mediaType": "image/png", "filename": "pixel.png"},
    ]
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        # sendMessage({text, files}): the file parts (data: URLs), then the text, in the user message's parts.
        steps = [{"send": "look at these", "files": files}]
        result = await ai_sdk.run("send", server.url, session_id, "--steps", json.dumps(steps))
        history = await messages(client, session_id)
        contents = [(await client.get(part["url"])).content for part in history[0]["parts"][:2]]
        reloaded = await ai_sdk.run("resume", server.url, session_id, "--hydrate")

    assert result["error"] is None and result["status"] == "ready", result
    # The echo agent names each file it was given.
    assert (
        result["assistant"]["text"]
        == f"look at these\n[file: notes.md, {len(notes)} bytes]\n[file: pixel.png, 768 bytes]"
    )
    sent = result["messages"][0]["parts"]
    assert sent == [
        {"type": "file", "mediaType": "text/markdown", "filename": "notes.md", "url": digest(notes)},
        {"type": "file", "mediaType": "image/png", "filename": "pixel.png", "url": digest(pixel)},
        {"type": "text", "text": "look at these"},
    ]
    # History keeps them as the user message's files, and gives them back as its parts, each url its bytes.
    user = history[0]
    assert len(user["file_ids"]) == 2 and contents == [notes, pixel]
    assert user["parts"] == [
        {**part, "url": f"/api/v1/files/{session_id}/{file_id}/content"}
        for part, file_id in zip(sent[:2], user["file_ids"], strict=True)
    ] + [sent[2]]
    # A reload (a chat built from history alone) shows the same files.
    assert reloaded["messages"][0]["parts"] == user["parts"]
    assert [(m["id"], m["text"]) for m in reloaded["messages"]] == [(m["id"], m["text"]) for m in result["messages"]]


async def test_sending_only_the_last_message_keeps_a_chat_with_files_under_the_body_limit(
    live: Callable[..., LiveServer], ai_sdk: AISDK, tmp_path: Path
) -> None:
    # A JSON chat body may be 16 x PARLEY_MAX_MESSAGE_BYTES + 64 KiB: 320 KiB here. Each message carries a 100 kB
    # file (134 kB as a data: URL): the whole chat passes the limit at the third message.
    server = live(max_message_bytes=16 * 1024)
    steps: list[dict[str, Any]] = []
    for n in range(3):
        (tmp_path / f"f{n}.bin").write_bytes(os.urandom(100_000))
        file = {"path": str(tmp_path / f"f{n}.bin"), "mediaType": "application/octet-stream", "filename": f"f{n}.bin"}
        steps.append({"send": f"file {n}", "files": [file]})
    async with server.client() as client:
        whole = await new_session(client)
        everything = await ai_sdk.run("send", server.url, whole, "--steps", json.dumps(steps))
        last = await new_session(client)
        # The README's recipe (prepareSendMessagesRequest: only the last message, with its trigger and messageId):
        # then regenerate and edit as a person would.
        steps += [{"regenerate": None}, {"edit": 2, "text": "file 1, edited"}, {"send": "and more"}]
        only_last = await ai_sdk.run("send", server.url, last, "--steps", json.dumps(steps), "--last-only")
        history = await messages(client, last)
        files = (await client.get(f"/api/v1/files/{last}")).json()["files"]

    # The AI SDK's default sends the whole chat, data: URLs and all, on every message.
    assert everything["status"] == "error" and "larger than the limit" in everything["error"]["sentence"], everything
    if ai_sdk.package == "ai":
        assert everything["error"]["statusCode"] == 413
    assert only_last["error"] is None and only_last["status"] == "ready", only_last
    assert [(m["role"], m["text"]) for m in only_last["messages"]] == [
        ("user", "file 0"),
        ("assistant", "file 0\n[file: f0.bin, 100000 bytes]"),
        ("user", "file 1, edited"),
        ("assistant", "file 1, edited"),
        ("user", "and more"),
        ("assistant", "and more"),
    ]
    assert [(m["id"], m["role"], m["text"]) for m in only_last["messages"]] == [
        (m["id"], m["role"], m["content"]) for m in history
    ]
    # The edit dropped the second and third messages; their files stay with the session, as the README says.
    assert [f["filename"] for f in files] == ["f0.bin", "f1.bin", "f2.bin"]
    assert [len(m["file_ids"]) for m in history if m["role"] == "user"] == [1, 0, 0]
