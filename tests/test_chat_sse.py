"""POST /api/v1/chat in the AI SDK's UI message stream protocol (SSE), and its JSON bodies, on a real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from parley import ui_messages
from parley.agents import Agents
from parley.agents.events import Reasoning
from parley.app import create_app
from tests.conftest import FailingAgent, LiveServer, make_settings, messages, new_session

pytestmark = pytest.mark.anyio

SSE = {"accept": "text/event-stream"}
# What the AI SDK 6 accepts (7 adds "interrupted"): parley sends only these, so both majors read its streams.
FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "other"}


def parse_sse(body: str) -> list[tuple[str | None, str]]:
    """(id, data) of each event; comments (keep-alives) are returned as (None, ':...')."""
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append((None, block))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("id"), fields["data"]))
    return events


def check_stream(body: str, interaction_id: str) -> tuple[list[dict[str, Any]], str]:
    """Assert the frame ids and the parts' order; return the parts and the text of the deltas."""
    events = [event for event in parse_sse(body) if event[0] is not None or not event[1].startswith(":")]
    assert events[-1] == (None, "[DONE]")
    ids = [event_id for event_id, _ in events[:-1]]
    assert ids == [f"{interaction_id}:{seq}" for seq in range(len(ids))]
    parts = [json.loads(data) for _, data in events[:-1]]
    kinds = [part["type"] for part in parts]
    assert kinds[:2] == ["start", "text-start"]
    assert kinds[-1] == "finish"
    assert parts[-1]["finishReason"] in FINISH_REASONS
    end = kinds.index("text-end")
    assert set(kinds[2:end]) <= {"text-delta"}
    assert kinds[end + 1 : -1] in ([], ["message-metadata", "error"])
    return parts, "".join(part["delta"] for part in parts[2:end])


def ai_sdk_body(
    session_id: str, text: str, trigger: str = "submit-message", user_id: str = "u2", **extra: Any
) -> dict[str, Any]:
    return {
        "id": session_id,
        "messages": [
            {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "earlier"}]},
            {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "earlier"}]},
            {
                "id": user_id,
                "role": "user",
                "parts": [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}],
            },
        ],
        "trigger": trigger,
        **extra,
    }


@pytest.mark.parametrize("text", ["hello ", 'a "quote" and a \\ ', "line\n\ttab", "café ✓ 😀", "</script>", "\x00\x1f"])
async def test_a_delta_frame_carries_its_text_exactly(text: str) -> None:
    head = "id: int_1:5\ndata: "  # token 3 is frame 5 (after start and text-start)
    frame = ui_messages.delta("int_1", 3, text).decode()
    assert frame.startswith(head) and frame.endswith("\n\n")
    assert json.loads(frame[len(head) : -2]) == {"type": "text-delta", "id": "text", "delta": text}


@pytest.mark.parametrize("text", ["hello ", 'a "quote" and a \\ ', "line\n\ttab", "café ✓ 😀", "</script>", "\x00\x1f"])
async def test_a_run_of_reasoning_frames_each_piece_exactly(text: str) -> None:
    framer = ui_messages.Framer()
    first = framer.frames("int_1", 1, Reasoning("thinking "))  # reasoning-start, then its first delta
    frames = [frame.decode() for frame in [*first, *framer.frames("int_1", 3, Reasoning(text))]]
    assert [frame.partition("\n")[0] for frame in frames] == ["id: int_1:1", "id: int_1:2", "id: int_1:3"]
    parts = [json.loads(frame.partition("\ndata: ")[2].removesuffix("\n\n")) for frame in frames]
    assert parts == [
        {"type": "reasoning-start", "id": "reasoning-0"},
        {"type": "reasoning-delta", "id": "reasoning-0", "delta": "thinking "},
        {"type": "reasoning-delta", "id": "reasoning-0", "delta": text},
    ]


async def test_a_form_chat_asking_for_sse_gets_the_ui_message_stream(live: Callable[..., LiveServer]) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post(
            "/api/v1/chat", data={"ui_session_id": session_id, "message": "hello  there\n"}, headers=SSE
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        interaction_id = response.headers["x-interaction-id"]
        parts, text = check_stream(response.text, interaction_id)
        history = await messages(client, session_id)
    assert text == history[-1]["content"] == "hello  there\n"
    assert parts[0] == {
        "type": "start",
        "messageId": history[-1]["id"],
        "messageMetadata": {"ui_session_id": session_id, "interaction_id": interaction_id, "status": "streaming"},
    }
    assert parts[-1] == {"type": "finish", "finishReason": "stop", "messageMetadata": {"status": "complete"}}


async def test_the_ai_sdk_body_answers_the_last_user_message_in_sse(live: Callable[..., LiveServer]) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", json=ai_sdk_body(session_id, "the question"))
        assert response.headers["content-type"] == "text/event-stream"
        _, text = check_stream(response.text, response.headers["x-interaction-id"])
        assert text == "the question"
        again = await client.post("/api/v1/chat", json=ai_sdk_body(session_id, "the question", "regenerate-message"))
        assert check_stream(again.text, again.headers["x-interaction-id"])[1] == "the question"
        plain = await client.post(
            "/api/v1/chat", json=ai_sdk_body(session_id, "plain please", user_id="u3"), headers={"accept": "text/plain"}
        )
        assert (plain.headers["content-type"], plain.text) == ("text/plain; charset=utf-8", "plain please")
        history = await messages(client, session_id)
    # The regeneration took the first reply's place (the client dropped it), after the same user message, whose
    # id is the client's.
    assert [(m["id"], m["role"], m["content"]) for m in history] == [
        ("u2", "user", "the question"),
        (again_reply(history, again.headers["x-interaction-id"]), "assistant", "the question"),
        ("u3", "user", "plain please"),
        (history[3]["id"], "assistant", "plain please"),
    ]


def again_reply(history: list[dict[str, Any]], interaction_id: str) -> str:
    (reply,) = [m for m in history if m["role"] == "assistant" and m["interaction_id"] == interaction_id]
    return str(reply["id"])


async def test_parley_json_body_is_plain_text_unless_sse_is_asked_for(live: Callable[..., LiveServer]) -> None:
    server = live()
    async with server.client() as client:
        session_id = await new_session(client)
        plain = await client.post("/api/v1/chat", json={"ui_session_id": session_id, "message": "json"})
        assert (plain.headers["content-type"], plain.text) == ("text/plain; charset=utf-8", "json")
        sse = await client.post("/api/v1/chat", json={"ui_session_id": session_id, "message": "json"}, headers=SSE)
        assert check_stream(sse.text, sse.headers["x-interaction-id"])[1] == "json"


ON_DISCONNECT = "on_disconnect must be 'cancel' or 'continue'."
FILE_IDS = 'Invalid file_ids format: expected a JSON array of strings, like ["file_123"].'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "The body is not valid JSON."),
        (b"[1, 2]", "The JSON body must be an object."),
        (b'{"ui_session_id": "s"}', "The field 'message' is required and must not be empty."),
        (b'{"ui_session_id": 0, "message": "hi"}', "The field 'ui_session_id' is required and must not be empty."),
        (b'{"id": "s", "messages": 3}', "messages must be an array of UI messages."),
        (b'{"id": "s", "messages": []}', "messages has no user message to answer."),
        (b'{"id": "s", "messages": [], "trigger": "x"}', "trigger must be 'submit-message' or 'regenerate-message'."),
        (b'{"id": "s", "message": {"role": "assistant", "parts": []}}', "messages has no user message to answer."),
        (b'{"ui_session_id": "s", "message": "hi", "on_disconnect": "later"}', ON_DISCONNECT),
        (b'{"ui_session_id": "s", "message": "hi", "file_ids": [1]}', FILE_IDS),
    ],
)  # fmt: skip
async def test_a_bad_json_body_is_a_400(live: Callable[..., LiveServer], body: bytes, message: str) -> None:
    server = live()
    async with server.client() as client:
        response = await client.post("/api/v1/chat", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"status": "error", "message": message}


async def test_a_failure_after_the_first_token_is_an_error_part(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent(after=2)])))
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "x"}, headers=SSE)
        assert response.status_code == 200
        parts, text = check_stream(response.text, response.headers["x-interaction-id"])
        history = await messages(client, session_id)
    assert (text, history[-1]["content"], history[-1]["status"]) == ("t0 t1 ", "t0 t1 ", "error")
    assert parts[-3:] == [
        {"type": "message-metadata", "messageMetadata": {"status": "error"}},
        {"type": "error", "errorText": "The model fell over."},
        {"type": "finish", "finishReason": "error", "messageMetadata": {"status": "error"}},
    ]


async def test_a_failure_before_the_first_token_keeps_its_json_status(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(make_settings(tmp_path, agent="failing"), agents=Agents([FailingAgent(after=0)])))
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", json=ai_sdk_body(session_id, "hi"))
        assert response.status_code == 500
        assert response.json() == {"status": "error", "message": "The model fell over."}
        missing = await client.post("/api/v1/chat", json=ai_sdk_body("ses_nobody", "hi"))
        assert missing.status_code == 404
        assert missing.json() == {"status": "error", "message": "Session not found: ses_nobody"}


async def test_a_cancelled_sse_reply_finishes_with_its_status(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.02)
    words = " ".join(f"w{i}" for i in range(200))
    async with server.client() as client, server.client() as canceller:
        session_id = await new_session(client)
        body = ""
        cancelled: httpx.Response | None = None
        async with client.stream(
            "POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": words}, headers=SSE
        ) as response:
            interaction_id = response.headers["x-interaction-id"]
            async for chunk in response.aiter_text():
                body += chunk
                if body.count("text-delta") >= 3 and cancelled is None:
                    cancelled = await canceller.post("/api/v1/cancel", data={"ui_session_id": session_id})
        assert cancelled is not None and cancelled.json()["cancelled"] is True
        parts, text = check_stream(body, interaction_id)
        history = await messages(client, session_id)
    assert (history[-1]["status"], history[-1]["content"]) == ("cancelled", text)
    assert 3 <= len(text.split()) < 200
    assert parts[-1] == {"type": "finish", "finishReason": "other", "messageMetadata": {"status": "cancelled"}}


async def test_a_replys_start_says_streaming_as_history_and_the_rejoin_do_while_it_runs(
    live: Callable[..., LiveServer],
) -> None:
    server = live(echo_delay=0.05)
    words = " ".join(f"w{i}" for i in range(200))
    async with server.client() as client:
        session_id = await new_session(client)
        form = {"ui_session_id": session_id, "message": words, "on_disconnect": "continue"}
        body = ""
        async with client.stream("POST", "/api/v1/chat", data=form, headers=SSE) as response:
            async for chunk in response.aiter_text():
                body += chunk
                if "text-delta" in body:
                    break
        start = json.loads(parse_sse(body)[0][1])
        reply = (await messages(client, session_id))[-1]  # (the reply runs on: on_disconnect=continue)
        body = ""
        async with client.stream("GET", f"/api/v1/chat/{session_id}/stream", headers=SSE) as rejoined:
            async for chunk in rejoined.aiter_text():
                body += chunk
                if "\n\n" in body:
                    break
        rejoined_start = json.loads(parse_sse(body)[0][1])
        await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
    # useChat keeps start's metadata as the message's until finish merges its own: while the reply runs, what the
    # client holds is what history and a rejoin give for it.
    streaming = {"ui_session_id": session_id, "interaction_id": reply["interaction_id"], "status": "streaming"}
    assert reply["status"] == "streaming" and reply["metadata"] == streaming
    assert start["messageMetadata"] == rejoined_start["messageMetadata"] == streaming
    assert start["messageId"] == rejoined_start["messageId"] == reply["id"]


async def test_keep_alive_comments_while_the_agent_is_silent(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.3, sse_keepalive_seconds=0.05)
    async with server.client() as client:
        session_id = await new_session(client)
        response = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "a b"}, headers=SSE)
        events = parse_sse(response.text)
        assert (None, ": keep-alive") in events
        assert check_stream(response.text, response.headers["x-interaction-id"])[1] == "a b"
