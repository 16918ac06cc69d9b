"""parley mounted inside a larger Starlette app, whose lifespan does not run the mounted app's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from parley.app import create_app
from tests.conftest import LiveServer, RedisServer, Subprocess, eventually, make_settings, start_together

pytestmark = pytest.mark.anyio


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host's own page")


async def test_chat_through_a_parent_app(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    parley = create_app(make_settings(tmp_path, echo_delay=0.01))
    host = Starlette(routes=[Route("/", home), Mount("/chat", app=parley)])
    server = serve(host)
    async with server.client() as client:
        assert (await client.get("/")).text == "the host's own page"
        created = await client.post("/chat/api/v1/sessions")
        assert created.status_code == 201
        session_id = created.json()["ui_session_id"]
        async with client.stream(
            "POST", "/chat/api/v1/chat", data={"ui_session_id": session_id, "message": "through the host"}
        ) as response:
            assert response.status_code == 200
            body = (await response.aread()).decode()
        assert body == "through the host"
        history = (await client.get(f"/chat/api/v1/sessions/{session_id}/messages")).json()["messages"]
        assert [m["status"] for m in history] == ["complete", "complete"]
        cancel = await client.post("/chat/api/v1/cancel", data={"ui_session_id": session_id})
        assert cancel.json()["cancelled"] is False
        missing = await client.get("/chat/api/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["status"] == "error"


async def test_a_mounted_app_still_checkpoints_its_replies_on_time(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    # The process's checkpoints run in the app's lifespan, which a host does not run for a mounted app: each turn
    # then keeps a timer of its own, and the history still shows the text so far while the reply streams.
    parley = create_app(make_settings(tmp_path, echo_delay=0.05, checkpoint_seconds=0.1))
    server = serve(Starlette(routes=[Mount("/chat", app=parley)]))
    words = " ".join(f"w{i}" for i in range(60))
    async with server.client() as client:
        session_id = (await client.post("/chat/api/v1/sessions")).json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": words}
        async with client.stream("POST", "/chat/api/v1/chat", data=data) as response:
            assert response.status_code == 200

            async def partial() -> bool:
                history = (await client.get(f"/chat/api/v1/sessions/{session_id}/messages")).json()["messages"]
                last = history[-1]
                return bool(last["status"] == "streaming" and len(last["content"].split()) >= 3)

            await eventually(partial)
            await response.aread()


async def test_mounted_without_its_lifespan_on_redis_it_hears_cancels_and_rejoins_from_other_processes(
    subprocesses: Callable[..., Subprocess], redis_server: RedisServer
) -> None:
    # Issue 24 §2. Mounted in a host app, parley's lifespan does not run: nothing listened for the cancels and
    # rejoins that other processes send. The first request starts the listener.
    env = {"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.03"}
    a, b = start_together(subprocesses(env, app="tests.hosted:app"), subprocesses(env, app="tests.hosted:app"))
    message = " ".join(f"h{i}" for i in range(100))
    async with httpx.AsyncClient(timeout=20) as client:
        session_id = (await client.post(f"{a.url}/chat/api/v1/sessions")).json()["ui_session_id"]
        data = {"ui_session_id": session_id, "message": message}
        # A rejoin through B follows the reply that A runs.
        async with client.stream("POST", f"{a.url}/chat/api/v1/chat", data=data) as response:
            chunks = response.aiter_text()
            assert await anext(chunks)
            stream = f"{b.url}/chat/api/v1/chat/{session_id}/stream"
            async with client.stream("GET", stream, headers={"accept": "text/plain"}) as rejoin:
                assert rejoin.status_code == 200
                followed = (await rejoin.aread()).decode()
        assert followed == message
        # A cancel through B stops the reply that A runs.
        received = ""
        cancel: httpx.Response | None = None
        async with client.stream("POST", f"{a.url}/chat/api/v1/chat", data=data) as response:
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 3 and cancel is None:
                    cancel = await client.post(f"{b.url}/chat/api/v1/cancel", data={"ui_session_id": session_id})
        assert cancel is not None and cancel.status_code == 200, cancel
        assert cancel.json()["cancelled"] is True
        assert len(received) < len(message)
        turns = (await client.get(f"{b.url}/chat/api/v1/sessions/{session_id}/messages")).json()["messages"]
        assert [t["status"] for t in turns] == ["complete", "complete", "complete", "cancelled"]
