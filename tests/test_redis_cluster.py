"""Scale-out on a real 3-node Redis Cluster that the tests start (``redis_cluster`` in conftest): two uvicorn
workers with PARLEY_REDIS_CLUSTER=1, each told one node. Chats, the busy rule, a cancel, a rejoin, a delete and the
line of waiting messages (if_busy) from the other worker, on sessions whose keys live on every node. (The store
contract runs on the cluster too: tests/test_store.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from redis.cluster import RedisCluster

from tests.conftest import RedisClusterServers, Subprocess, eventually, pair
from tests.test_redis import WORDS, chat, history, session_on

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def sessions_on_every_node(
    client: httpx.AsyncClient, server: Subprocess, cluster: RedisClusterServers
) -> list[str]:
    """New sessions until their keys (``parley:{<id>}:...``) live on each of the three nodes."""
    nodes = RedisCluster.from_url(cluster.url)
    try:
        by_node: dict[str, str] = {}
        for _ in range(100):
            session_id = await session_on(client, server)
            node = nodes.get_node_from_key(f"parley:{{{session_id}}}:session")
            assert node is not None
            by_node.setdefault(node.name, session_id)
            if len(by_node) == 3:
                return list(by_node.values())
    finally:
        nodes.close()
    raise AssertionError("100 sessions and not one on every node")


async def test_chats_the_busy_rule_and_a_cancel_across_two_workers(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_cluster)
    async with httpx.AsyncClient(timeout=20) as client:
        sessions = await sessions_on_every_node(client, a, redis_cluster)
        for turn, session_id in enumerate(sessions * 2):  # two turns each, on one worker then the other
            server = (a, b)[turn % 2]
            answer = await client.post(
                f"{server.url}/api/v1/chat", data={"ui_session_id": session_id, "message": f"m{turn}"}
            )
            assert (answer.status_code, answer.text) == (200, f"m{turn}")
        for index, session_id in enumerate(sessions):
            turns = await history(client, b.url, session_id)
            assert [(t["content"], t["status"]) for t in turns] == [
                (f"m{index}", "complete"),
                (f"m{index}", "complete"),
                (f"m{index + 3}", "complete"),
                (f"m{index + 3}", "complete"),
            ]
        listed = (await client.get(f"{b.url}/api/v1/sessions")).json()["sessions"]
        assert {s["ui_session_id"] for s in listed} >= set(sessions)

        for session_id in sessions:
            received = ""
            answer: httpx.Response | None = None
            async with chat(client, a, session_id) as response:
                interaction_id = response.headers["x-interaction-id"]
                async for chunk in response.aiter_text():
                    received += chunk
                    if len(received.split()) >= 3 and answer is None:
                        status = (await client.get(f"{b.url}/api/v1/sessions/{session_id}")).json()["status"]
                        assert status == "streaming"
                        busy = await client.post(
                            f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "x"}
                        )
                        assert busy.status_code == 409
                        answer = await client.post(
                            f"{b.url}/api/v1/cancel",
                            data={"ui_session_id": session_id, "interaction_id": interaction_id},
                        )
            assert answer is not None and answer.status_code == 200, answer
            assert answer.json()["cancelled"] is True
            assert len(received.split()) < 100
            turns = await history(client, b.url, session_id)
            assert (turns[-1]["status"], turns[-1]["content"]) == ("cancelled", received)
            again = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "on b"})
            assert again.text == "on b"


async def test_a_rejoin_from_the_other_worker(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_cluster)
    async with httpx.AsyncClient(timeout=20) as client:
        for session_id in await sessions_on_every_node(client, a, redis_cluster):
            original, followed = "", ""

            async def follow(session_id: str = session_id) -> None:
                nonlocal followed
                headers = {"accept": "text/plain"}
                async with client.stream("GET", f"{b.url}/api/v1/chat/{session_id}/stream", headers=headers) as rejoin:
                    assert rejoin.status_code == 200
                    async for chunk in rejoin.aiter_text():
                        followed += chunk

            async with chat(client, a, session_id) as response, anyio.create_task_group() as tg:
                async for chunk in response.aiter_text():
                    if not original:
                        tg.start_soon(follow)
                    original += chunk
            assert original == WORDS
            assert followed == WORDS
            assert (await history(client, b.url, session_id))[-1]["content"] == WORDS


async def test_a_delete_from_the_other_worker_stops_the_stream(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_cluster)
    async with httpx.AsyncClient(timeout=20) as client:
        for session_id in await sessions_on_every_node(client, a, redis_cluster):
            received = ""
            async with chat(client, a, session_id) as response:
                async for chunk in response.aiter_text():
                    if not received:
                        deleted = await client.delete(f"{b.url}/api/v1/sessions/{session_id}")
                        assert deleted.status_code == 200
                    received += chunk
            assert 0 < len(received.split()) < 100
            assert (await client.get(f"{a.url}/api/v1/sessions/{session_id}")).status_code == 404

            async def gone_from_the_list(session_id: str = session_id) -> bool:
                listed = (await client.get(f"{b.url}/api/v1/sessions")).json()["sessions"]
                return session_id not in {s["ui_session_id"] for s in listed}

            await eventually(gone_from_the_list)


async def test_the_line_of_waiting_messages_and_an_interrupt_across_two_workers(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_cluster)
    async with httpx.AsyncClient(timeout=20) as client:
        for session_id in await sessions_on_every_node(client, a, redis_cluster):
            answers: dict[str, httpx.Response] = {}

            async def send(
                server: Subprocess,
                text: str,
                if_busy: str,
                session_id: str = session_id,
                answers: dict[str, httpx.Response] = answers,
            ) -> None:
                form = {"ui_session_id": session_id, "message": text, "if_busy": if_busy}
                answers[text] = await client.post(f"{server.url}/api/v1/chat", data=form)

            async def line(session_id: str = session_id) -> list[str]:
                return list((await client.get(f"{a.url}/api/v1/sessions/{session_id}")).json()["queued_interactions"])

            async def waiting(count: int) -> bool:
                return len(await line()) == count

            async with chat(client, a, session_id) as response, anyio.create_task_group() as tg:
                chunks = response.aiter_text()  # (kept: a dropped iterator closes the response)
                await anext(chunks)
                tg.start_soon(send, b, "queued", "enqueue")
                await eventually(lambda: waiting(1))
                tg.start_soon(send, a, "dropped", "enqueue")
                await eventually(lambda: waiting(2))
                dropped = (await line())[1]
                cancel = await client.post(
                    f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": dropped}
                )
                assert cancel.json()["cancelled"] is True
                await eventually(lambda: waiting(1))
                tg.start_soon(send, b, "now", "interrupt")  # first in the line: stops the reply, then runs
                async for _ in chunks:
                    pass
            assert answers["dropped"].status_code == 409
            assert (answers["now"].text, answers["queued"].text) == ("now", "queued")
            turns = await history(client, b.url, session_id)
            assert [(t["content"], t["status"]) for t in turns][2:] == [
                ("now", "complete"),
                ("now", "complete"),
                ("queued", "complete"),
                ("queued", "complete"),
            ]
            assert turns[1]["status"] == "cancelled"


async def test_a_cluster_node_named_without_the_cluster_setting_says_so(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    # PARLEY_REDIS_URL names a node of a cluster but PARLEY_REDIS_CLUSTER is not set: every request that reaches
    # a key of another node would get MOVED (a 500). It is a clear 503 that names the setting, every time.
    server = subprocesses({"PARLEY_REDIS_URL": redis_cluster.url, "PARLEY_DATA_DIR": str(tmp_path / "a")}).start()
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(5):
            answer = await client.post(f"{server.url}/api/v1/sessions")
            assert answer.status_code == 503, answer.text
            assert "PARLEY_REDIS_CLUSTER=1" in answer.text
