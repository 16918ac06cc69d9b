"""The design holds on trio: ``hypercorn --worker-class trio app:app`` serves the embedded default (SQLite, the echo
and openai agents) — chats in plain text and SSE, cancels, disconnects, rejoins and file uploads — and the Redis
store, which needs asyncio, refuses trio at start-up in one line."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn

from tests.conftest import Subprocess, eventually, free_port, messages, new_session
from tests.openai_stub import OpenAIStub

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    """The OpenAI-compatible stub on a uvicorn of its own, in a thread (the clients here are asyncio's)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(OpenAIStub(), log_level="warning", lifespan="off", http="h11", loop="asyncio")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, args=([sock],), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the stub did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def trio_url(stub_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "PARLEY_DATA_DIR": str(tmp_path_factory.mktemp("trio")),
        "PARLEY_ECHO_DELAY": "0.02",
        "PARLEY_OPENAI_BASE_URL": stub_url,
        "PARLEY_OPENAI_MODEL": "tokens",
        "PARLEY_OPENAI_API_KEY": "sk-test-secret-key",
    }
    server = Subprocess(env, ("--worker-class", "trio"), hypercorn=True).start()
    yield server.url
    server.stop(kill=True)


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=10)


async def test_chats_in_plain_text_and_sse(trio_url: str) -> None:
    async with client(trio_url) as http:
        session_id = await new_session(http)
        plain = await http.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hello trio"})
        assert plain.status_code == 200 and plain.text == "hello trio"
        sse = await http.post(
            "/api/v1/chat",
            data={"ui_session_id": session_id, "message": "and SSE"},
            headers={"accept": "text/event-stream"},
        )
        assert sse.status_code == 200 and sse.headers["content-type"] == "text/event-stream"
        parts = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: {")]
        assert "".join(part["delta"] for part in parts if part["type"] == "text-delta") == "and SSE"
        assert parts[-1] == {"type": "finish", "finishReason": "stop", "messageMetadata": {"status": "complete"}}
        history = await messages(http, session_id)
        assert [(m["role"], m["content"], m["status"]) for m in history] == [
            ("user", "hello trio", "complete"),
            ("assistant", "hello trio", "complete"),
            ("user", "and SSE", "complete"),
            ("assistant", "and SSE", "complete"),
        ]


async def test_the_openai_agent(trio_url: str) -> None:
    async with client(trio_url) as http:
        session_id = await new_session(http, agent="openai")
        reply = await http.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert reply.status_code == 200 and reply.text == "".join(OpenAIStub().tokens)


async def test_cancel_mid_stream(trio_url: str) -> None:
    async with client(trio_url) as http, client(trio_url) as canceller:
        session_id = await new_session(http)
        received = ""
        answer: httpx.Response | None = None
        data = {"ui_session_id": session_id, "message": WORDS}
        async with http.stream("POST", "/api/v1/chat", data=data) as response:
            interaction_id = response.headers["x-interaction-id"]
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 3 and answer is None:
                    answer = await canceller.post(
                        "/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": interaction_id}
                    )
        assert answer is not None and answer.json()["cancelled"] is True
        assert 3 <= len(received.split()) < 200
        history = await messages(http, session_id)
        assert (history[-1]["status"], history[-1]["content"]) == ("cancelled", received)


async def test_a_client_that_leaves_is_recorded_as_disconnected(trio_url: str) -> None:
    async with client(trio_url) as http:
        session_id = await new_session(http)
        async with http.stream("POST", "/api/v1/chat", data={"ui_session_id": session_id, "message": WORDS}) as r:
            async for _ in r.aiter_text():
                break

        async def recorded() -> bool:
            return (await messages(http, session_id))[-1]["status"] == "disconnected"

        await eventually(recorded)


async def test_rejoin_follows_a_running_reply_to_its_end(trio_url: str) -> None:
    async with client(trio_url) as http, client(trio_url) as follower:
        session_id = await new_session(http)
        message = " ".join(WORDS.split()[:30])
        async with anyio.create_task_group() as tg:
            sent: list[str] = []

            async def chat() -> None:
                reply = await http.post("/api/v1/chat", data={"ui_session_id": session_id, "message": message})
                sent.append(reply.text)

            tg.start_soon(chat)

            async def streaming() -> bool:
                return (await http.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "streaming"

            await eventually(streaming)
            rejoined = await follower.get(f"/api/v1/chat/{session_id}/stream", headers={"accept": "text/plain"})
        assert rejoined.status_code == 200
        assert rejoined.text == message == sent[0]


async def test_file_upload_then_a_chat_that_attaches_it(trio_url: str) -> None:
    async with client(trio_url) as http:
        session_id = await new_session(http)
        upload = await http.post(
            "/api/v1/files", data={"ui_session_id": session_id}, files={"file": ("notes.txt", b"some notes\n")}
        )
        assert upload.status_code == 201, upload.text
        file_id = upload.json()["id"]
        content = await http.get(f"/api/v1/files/{session_id}/{file_id}/content")
        assert content.content == b"some notes\n"
        reply = await http.post(
            "/api/v1/chat",
            json={"ui_session_id": session_id, "message": "read this", "file_ids": [file_id]},
        )
        assert reply.text == "read this\n[file: notes.txt, 11 bytes]"
        deleted = await http.delete(f"/api/v1/files/{session_id}/{file_id}")
        assert deleted.status_code == 200


def test_redis_refuses_trio_at_start_up_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {"PARLEY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PARLEY_DATA_DIR": str(tmp_path / "data")}
    server = Subprocess(env, ("--worker-class", "trio"), log=log, hypercorn=True).launch()
    assert server.process is not None
    try:
        server.process.wait(20)
    finally:
        server.stop(kill=True)
    output = log.read_text()
    refusal = [line for line in output.splitlines() if line.startswith("parley: ")]
    assert refusal == [
        "parley: PARLEY_REDIS_URL: the Redis store runs on asyncio only (redis-py); serve parley on asyncio "
        "(uvicorn, or hypercorn's asyncio or uvloop worker class), not on trio"
    ], output
    assert "Traceback" not in output, output
