"""Many streams at once, with random cancels and disconnects: nothing leaks, every turn ends recorded once."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import httpx
import pytest

from sessions.store import TERMINAL_STATUSES
from tests.conftest import LiveServer, eventually, messages, new_session

pytestmark = pytest.mark.anyio

STREAMS = 200
MESSAGE = " ".join(f"t{i}" for i in range(30))


async def test_200_concurrent_streams_with_random_cancels_and_disconnects(live: Callable[..., LiveServer]) -> None:
    server = live(echo_delay=0.03)
    rng = random.Random(20261126)
    plans = [(rng.choice(["complete", "cancel", "disconnect"]), rng.randint(1, 25)) for _ in range(STREAMS)]
    limits = httpx.Limits(max_connections=2 * STREAMS + 10, max_keepalive_connections=0)
    outcome: dict[str, tuple[str, str]] = {}

    async with server.client(limits=limits, timeout=30) as client:
        session_ids = [await new_session(client) for _ in range(STREAMS)]

        async def run(session_id: str, action: str, after: int) -> None:
            received = ""
            data = {"ui_session_id": session_id, "message": MESSAGE}
            async with client.stream("POST", "/api/v1/chat", data=data) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    received += chunk
                    if len(received.split()) >= after and action == "disconnect":
                        break
                    if len(received.split()) >= after and action == "cancel":
                        answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
                        action = "cancelled" if answer.json()["cancelled"] else "too late"
            outcome[session_id] = (action, received)

        async with anyio.create_task_group() as tg:
            for session_id, (action, after) in zip(session_ids, plans, strict=True):
                tg.start_soon(run, session_id, action, after)

        # Disconnects are noticed by the server a moment after the client leaves.
        await eventually(lambda: _no_interactions(server), within=10)

        counts: dict[str, int] = {}
        for session_id in session_ids:
            assert (await client.get(f"/api/v1/sessions/{session_id}")).json()["status"] == "idle"
            history = await messages(client, session_id)
            assert [m["role"] for m in history] == ["user", "assistant"]
            reply = history[1]
            assert reply["status"] in TERMINAL_STATUSES
            action, received = outcome[session_id]
            counts[reply["status"]] = counts.get(reply["status"], 0) + 1
            if action == "complete":
                assert (reply["status"], reply["content"], received) == ("complete", MESSAGE, MESSAGE)
            elif action == "cancelled":  # the cancel said it stopped the stream: it did
                assert reply["status"] == "cancelled"
                assert reply["content"] == received
            elif action == "too late":  # the cancel said there was nothing left to stop
                assert (reply["status"], reply["content"]) == ("complete", MESSAGE)
            else:
                assert reply["status"] in {"disconnected", "complete"}
                assert reply["content"].startswith(received)
    assert counts.get("cancelled", 0) > 20
    assert counts.get("disconnected", 0) > 20


async def _no_interactions(server: LiveServer) -> bool:
    return len(server.app.state.parley.interactions) == 0
