"""parley under both of uvicorn's stacks: the pure-Python one (h11, asyncio) and the default, httptools and uvloop.

The fast stack is what `pip install parley` gives (see bench/RESULTS.md for why); the pure-Python one must keep
working for platforms without the C packages. Everything else in the suite runs on the default stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import Subprocess

STACKS = {
    "h11+asyncio": ("--http", "h11", "--loop", "asyncio"),
    "httptools+uvloop": ("--http", "httptools", "--loop", "uvloop"),
}


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.anyio
async def test_a_reply_streams_and_a_cancel_stops_it_under_each_stack(
    stack: str, subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_ECHO_DELAY": "0.05"}
    server = subprocesses(env, STACKS[stack]).start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        session_id = (await client.post("/api/v1/sessions")).json()["ui_session_id"]
        whole = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "two words"})
        assert (whole.status_code, whole.text) == (200, "two words")

        chat = {"ui_session_id": session_id, "message": " ".join(["word"] * 200)}
        received = b""
        with anyio.fail_after(10):
            async with client.stream("POST", "/api/v1/chat", data=chat) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    if not received:
                        cancel = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
                        assert cancel.json()["cancelled"] is True
                    received += chunk

        history = (await client.get(f"/api/v1/sessions/{session_id}/messages")).json()["messages"]
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "cancelled"),
    ]
    assert history[-1]["content"] == received.decode()
    assert 0 < len(received) < len(chat["message"])
