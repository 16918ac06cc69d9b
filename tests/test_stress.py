"""Many streams at once, with random cancels and disconnects: nothing leaks, every turn ends recorded once."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.types import ASGIApp

from parley.agents import Agents, Turn
from parley.agents.echo import EchoAgent
from parley.app import create_app
from parley.sessions.store import TERMINAL_STATUSES
from tests.conftest import LiveServer, eventually, make_settings, messages, new_session

pytestmark = pytest.mark.anyio

STREAMS = 200
MESSAGE = " ".join(f"t{i}" for i in range(30))


class HoldingEcho(EchoAgent):
    """The echo agent, except that the replies of ``held`` sessions do not end by themselves: after the last word
    they wait to be stopped. A cancel or a disconnect then always finds its reply running, however late the
    client (which reads behind the server on a loaded machine) gets to send it."""

    def __init__(self, delay: float, held: set[str]) -> None:
        super().__init__(delay)
        self.held = held

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        async with aclosing(super().reply(turn)) as tokens:
            async for token in tokens:
                yield token
        if turn.session_id in self.held:
            await anyio.sleep_forever()


async def test_200_concurrent_streams_with_random_cancels_and_disconnects(
    serve: Callable[[ASGIApp], LiveServer], tmp_path: Path
) -> None:
    held: set[str] = set()
    server = serve(create_app(make_settings(tmp_path), agents=Agents([HoldingEcho(0.03, held)])))
    rng = random.Random(20261126)
    # "late cancel": a cancel sent after the whole reply was read, when there is nothing left to stop.
    actions = ["complete", "cancel", "disconnect", "late cancel"]
    plans = [(rng.choice(actions), rng.randint(1, 25)) for _ in range(STREAMS)]
    limits = httpx.Limits(max_connections=2 * STREAMS + 10, max_keepalive_connections=0)
    outcome: dict[str, tuple[str, str]] = {}

    async with server.client(limits=limits, timeout=30) as client:
        session_ids = [await new_session(client) for _ in range(STREAMS)]
        held.update(s for s, (action, _) in zip(session_ids, plans, strict=True) if action in ("cancel", "disconnect"))

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
                        assert answer.json()["cancelled"] is True  # its reply cannot have ended without it
                        action = "cancelled"
            if action == "late cancel":
                answer = await client.post("/api/v1/cancel", data={"ui_session_id": session_id})
                assert answer.json()["cancelled"] is False
            outcome[session_id] = (action, received)

        async with anyio.create_task_group() as tg:
            for session_id, (action, after) in zip(session_ids, plans, strict=True):
                tg.start_soon(run, session_id, action, after)

        # Disconnects are noticed by the server a moment after the client leaves.
        await eventually(lambda: _no_interactions(server, session_ids), within=10)

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
            elif action == "late cancel":  # the cancel said there was nothing left to stop
                assert (reply["status"], reply["content"], received) == ("complete", MESSAGE, MESSAGE)
            else:
                assert reply["status"] == "disconnected"
                assert reply["content"].startswith(received)
    assert counts.get("cancelled", 0) > 20
    assert counts.get("disconnected", 0) > 20


async def _no_interactions(server: LiveServer, session_ids: list[str]) -> bool:
    interactions = server.app.state.parley.interactions
    return all(interactions.get(session_id) is None for session_id in session_ids)
