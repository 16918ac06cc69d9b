"""Scale-out: real uvicorn processes sharing a real redis-server (and, for contrast, one SQLite file)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from redis import Redis

from tests.conftest import RedisServer, Subprocess, eventually, pair

pytestmark = pytest.mark.anyio

WORDS = " ".join(f"w{i}" for i in range(100))


async def session_on(client: httpx.AsyncClient, server: Subprocess) -> str:
    return str((await client.post(f"{server.url}/api/v1/sessions")).json()["ui_session_id"])


def chat(client: httpx.AsyncClient, server: Subprocess, session_id: str, message: str = WORDS) -> Any:
    return client.stream("POST", f"{server.url}/api/v1/chat", data={"ui_session_id": session_id, "message": message})


async def kill_mid_reply(client: httpx.AsyncClient, owner: Subprocess, session_id: str) -> None:
    """``kill -9`` the owner once its reply has begun, its client still connected."""
    async with chat(client, owner, session_id) as response:
        # Keep the iterator: once dropped, it is closed at the next await, and closing it closes the
        # connection, which the server may then record as 'disconnected' before the kill lands.
        chunks = response.aiter_text()
        assert await anext(chunks)  # the stream had begun
        owner.stop(kill=True)


async def history(client: httpx.AsyncClient, url: str, session_id: str) -> list[dict[str, str]]:
    response = await client.get(f"{url}/api/v1/sessions/{session_id}/messages")
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def test_a_stream_on_a_is_cancelled_through_b(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server)
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        received = ""
        answer: httpx.Response | None = None
        async with chat(client, a, session_id) as response:
            interaction_id = response.headers["x-interaction-id"]
            async for chunk in response.aiter_text():
                received += chunk
                if len(received.split()) >= 3 and answer is None:  # once, however the words came in chunks
                    assert (await client.get(f"{b.url}/api/v1/sessions/{session_id}")).json()["status"] == "streaming"
                    busy = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "x"})
                    assert busy.status_code == 409
                    stale = await client.post(
                        f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": "int_stale"}
                    )
                    assert stale.json()["cancelled"] is False
                    cancelled_at = time.monotonic()
                    answer = await client.post(
                        f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id, "interaction_id": interaction_id}
                    )
            ended_at = time.monotonic()
        assert answer is not None and answer.status_code == 200, answer
        assert answer.json()["cancelled"] is True
        assert ended_at - cancelled_at < 1.0
        assert len(received.split()) < 100
        turns = await history(client, b.url, session_id)
        assert (turns[-1]["status"], turns[-1]["content"]) == ("cancelled", received)
        assert (await client.get(f"{b.url}/api/v1/sessions/{session_id}")).json()["status"] == "idle"
        again = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "on b"})
        assert again.text == "on b"
        idle = await client.post(f"{a.url}/api/v1/cancel", data={"ui_session_id": session_id})
        assert idle.json()["cancelled"] is False


async def test_delete_on_b_stops_the_stream_on_a(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server)
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        received = ""
        async with chat(client, a, session_id) as response:
            async for chunk in response.aiter_text():
                if not received:
                    deleted = await client.delete(f"{b.url}/api/v1/sessions/{session_id}")
                    assert deleted.status_code == 200
                received += chunk
        assert 0 < len(received.split()) < 100
        assert (await client.get(f"{a.url}/api/v1/sessions/{session_id}")).status_code == 404


async def test_a_killed_owner_frees_the_session_after_its_lease(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = pair(subprocesses, tmp_path, redis_server)
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        await kill_mid_reply(client, a, session_id)
        assert (await client.get(f"{b.url}/api/v1/sessions/{session_id}")).json()["status"] == "streaming"

        async def idle() -> bool:
            status = (await client.get(f"{b.url}/api/v1/sessions/{session_id}")).json()["status"]
            return bool(status == "idle")

        await eventually(idle, within=5)

        async def interrupted() -> bool:
            # A lease of grace after its claim went (issue 24 §1: its owner, were it alive, records it itself).
            turns = await history(client, b.url, session_id)
            return turns[-1]["status"] != "streaming"

        await eventually(interrupted, within=5)
        turns = await history(client, b.url, session_id)
        assert [(t["role"], t["status"]) for t in turns] == [("user", "complete"), ("assistant", "interrupted")]
        again = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "b now"})
        assert again.text == "b now"


async def test_redis_down_means_503_not_a_crash_and_recovery_without_restart(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # A lease longer than the outage lasts while the streams run: a stream outlives a short outage. (One that
    # cannot renew before its lease runs out stops: see test_an_owner_that_cannot_renew_stops_before_its_lease_ends.)
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_ECHO_DELAY="0.02", PARLEY_REDIS_LEASE_SECONDS="5")
    message = " ".join(f"x{i}" for i in range(60))  # 1.2 s of stream
    async with httpx.AsyncClient(timeout=20) as client:
        cancelled_one, finished_one, other = (
            await session_on(client, a),
            await session_on(client, a),
            await session_on(client, b),
        )
        results: dict[str, str] = {}

        async def stream(session_id: str) -> None:
            async with chat(client, a, session_id, message) as response:
                results[session_id] = (await response.aread()).decode()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream, cancelled_one)
            tg.start_soon(stream, finished_one)
            await eventually(lambda: _both_streaming(client, a, cancelled_one, finished_one))
            redis_server.stop()
            # A cancel of a stream the receiving process owns still works without Redis, and says so.
            own = await client.post(f"{a.url}/api/v1/cancel", data={"ui_session_id": cancelled_one})
            assert (own.status_code, own.json()["cancelled"]) == (200, True)
            # Anything that needs Redis is a clear 503.
            refused = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": other, "message": "hi"})
            assert refused.status_code == 503
            assert refused.json()["status"] == "error"
            remote = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": finished_one})
            assert remote.status_code == 503
        assert results[finished_one] == message  # a running stream finishes
        assert len(results[cancelled_one]) < len(message)
        assert (await client.get(f"{a.url}/healthz")).status_code == 200
        assert (await client.get(f"{b.url}/healthz")).status_code == 200

        redis_server.start()  # same port, same data

        # The streams ended while Redis was away; A keeps their last words and writes them once it is back.
        async def recorded() -> bool:
            statuses = []
            for session_id in (finished_one, cancelled_one):
                response = await client.get(f"{b.url}/api/v1/sessions/{session_id}/messages")
                statuses.append(response.json()["messages"][-1]["status"] if response.status_code == 200 else None)
            return statuses == ["complete", "cancelled"]

        await eventually(recorded, within=10)
        turns = await history(client, b.url, cancelled_one)
        assert turns[-1]["content"] == results[cancelled_one]
        assert (await history(client, b.url, finished_one))[-1]["content"] == message
        again = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": other, "message": "back"})
        assert again.text == "back"


async def test_the_embedded_store_says_when_a_cancel_cannot_reach_another_process(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    a, b = pair(subprocesses, tmp_path, None)
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        first = ""
        async with chat(client, a, session_id) as response:
            async for chunk in response.aiter_text():
                first = chunk
                answer = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id})
                stop = await client.post(f"{a.url}/api/v1/cancel", data={"ui_session_id": session_id})
                break
        assert first  # the stream had begun when B was asked
        assert answer.status_code == 500
        assert answer.json()["status"] == "error"
        assert "PARLEY_REDIS_URL" in answer.json()["message"]
        assert stop.json()["cancelled"] is True


async def _both_streaming(client: httpx.AsyncClient, server: Subprocess, *session_ids: str) -> bool:
    for session_id in session_ids:
        turns = (await client.get(f"{server.url}/api/v1/sessions/{session_id}/messages")).json()["messages"]
        if not turns or turns[-1]["status"] != "streaming":
            return False
    return True


async def test_the_embedded_store_refuses_a_chat_for_a_session_another_worker_deleted(
    subprocesses: Callable[..., Subprocess], tmp_path: Path
) -> None:
    a, b = pair(subprocesses, tmp_path, None, PARLEY_ECHO_DELAY="0")
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        first = await client.post(f"{a.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert first.text == "hi"  # A has now seen the session
        assert (await client.delete(f"{b.url}/api/v1/sessions/{session_id}")).status_code == 200
        again = await client.post(f"{a.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
        assert again.status_code == 404
        assert again.json() == {"status": "error", "message": f"Session not found: {session_id}"}
        assert (await client.get(f"{a.url}/api/v1/sessions/{session_id}/messages")).status_code == 404


async def test_the_next_message_may_go_to_any_worker_as_soon_as_the_reply_ends(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Behind a load balancer, a client's next message can reach another worker the moment the previous
    # reply has ended: the claim is released before the last chunk, not a Redis round trip after it.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_ECHO_DELAY="0")
    async with httpx.AsyncClient(timeout=10) as client:
        session_id = await session_on(client, a)
        for turn in range(40):
            server = (a, b)[turn % 2]
            answer = await client.post(f"{server.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "hi"})
            assert answer.status_code == 200, (turn, answer.text)
        assert [m["status"] for m in await history(client, b.url, session_id)] == ["complete"] * 80


async def test_an_owner_that_cannot_renew_stops_before_its_lease_ends(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Redis goes away while A streams, and stays away until A has stopped: A stops its reply before its claim can
    # run out (so B may take the session once Redis is back, and the two turns never overlap), and records it
    # interrupted.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="2")
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        received = await _redis_down_while_streaming(client, a, session_id, redis_server)

        async def idle_on_b() -> bool:
            # Once A's claim is gone (released, or run out with its lease), B sees the session free.
            answer = await client.get(f"{b.url}/api/v1/sessions/{session_id}")
            return answer.status_code == 200 and answer.json()["status"] == "idle"

        await eventually(idle_on_b, within=10)
        second = await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": session_id, "message": "b"})
        assert second.status_code == 200, second.text
        assert second.text == "b"
        assert 3 <= len(received.split()) < 400

        async def recorded() -> bool:
            turns = await history(client, b.url, session_id)
            # (B may mark it interrupted first, as its lease is gone; A then writes its text once Redis is back.)
            return len(turns) == 4 and turns[1]["status"] == "interrupted" and turns[1]["content"] == received

        await eventually(recorded, within=10)
        turns = await history(client, b.url, session_id)
        assert [(t["role"], t["status"]) for t in turns] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert turns[1]["content"] == received


async def _true(value: bool) -> bool:
    return value


async def stream_through_an_outage(
    client: httpx.AsyncClient,
    server: Subprocess,
    session_id: str,
    message: str,
    outage: Callable[[], object],
    down_for: float = 0.0,
) -> str:
    """Chat ``message`` on ``server`` and call ``outage()`` (a store or Redis stops) once its first words have
    arrived; return what the client received, once the response has ended (its owner stops a reply it cannot keep,
    then tries to record it) and ``down_for`` seconds have passed since the outage began."""
    received = ""
    ended = anyio.Event()

    async def follow() -> None:
        nonlocal received
        async with chat(client, server, session_id, message) as response:
            async for chunk in response.aiter_text():
                received += chunk
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await eventually(lambda: _true(len(received.split()) >= 3))
        outage()
        began = time.monotonic()
        with anyio.fail_after(15):
            await ended.wait()
        await anyio.sleep(max(0.0, began + down_for - time.monotonic()))
    return received


async def _redis_down_while_streaming(
    client: httpx.AsyncClient, a: Subprocess, session_id: str, redis_server: RedisServer, down_for: float = 0.0
) -> str:
    """A streams a 20 s reply; Redis stops after its first tokens and starts again once A's response has ended
    (A stops a reply whose claim it cannot renew, before its lease runs out), and no sooner than ``down_for``
    seconds after it stopped. What the client received."""
    message = " ".join(f"y{i}" for i in range(400))
    received = await stream_through_an_outage(client, a, session_id, message, redis_server.stop, down_for)
    redis_server.start()
    return received


async def test_delete_works_while_the_owner_is_dead_or_silent(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # A long lease: the delete must not wait for it to run out.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="20")
    async with httpx.AsyncClient(timeout=30) as client:
        # The owner dies mid-stream.
        dead = await session_on(client, a)
        await kill_mid_reply(client, a, dead)
        started = time.monotonic()
        deleted = await client.delete(f"{b.url}/api/v1/sessions/{dead}")
        assert deleted.status_code == 200, deleted.text
        assert time.monotonic() - started < 10
        assert (await client.get(f"{b.url}/api/v1/sessions/{dead}")).status_code == 404

        # The owner is silent (stopped) while the session is deleted, then comes back: it finds the session
        # gone and stops its reply, and nothing of the session comes back.
        c = subprocesses({"PARLEY_REDIS_URL": redis_server.url, "PARLEY_ECHO_DELAY": "0.05",
                          "PARLEY_REDIS_LEASE_SECONDS": "20"}).start()  # fmt: skip
        silent = await session_on(client, c)
        received = ""
        ended = False

        async def follow() -> None:
            nonlocal received, ended
            async with chat(client, c, silent, " ".join(f"z{i}" for i in range(400))) as response:
                async for chunk in response.aiter_text():
                    received += chunk
            ended = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await eventually(lambda: _true(len(received.split()) >= 2))
            assert c.process is not None
            c.process.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                deleted = await client.delete(f"{b.url}/api/v1/sessions/{silent}")
                assert deleted.status_code == 200, deleted.text
                assert time.monotonic() - started < 10
            finally:
                c.process.send_signal(signal.SIGCONT)
            await eventually(lambda: _true(ended), within=10)
        assert len(received.split()) < 400
        assert (await client.get(f"{b.url}/api/v1/sessions/{silent}")).status_code == 404
        assert (await client.get(f"{c.url}/api/v1/sessions/{silent}")).status_code == 404
        assert (
            await client.post(f"{b.url}/api/v1/chat", data={"ui_session_id": silent, "message": "x"})
        ).status_code == 404


async def test_a_cancel_through_b_for_a_dead_owner_answers_what_history_says(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # The owner is killed mid-reply: nobody answers on its channel. The cancel is not a 500: it waits the
    # lease out and says nothing was cancelled, and history says the reply was interrupted.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="2")
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        await kill_mid_reply(client, a, session_id)
        answer = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id})
        assert answer.status_code == 200, answer.text
        assert answer.json()["cancelled"] is False

        async def interrupted() -> bool:
            turns = await history(client, b.url, session_id)
            return [(t["role"], t["status"]) for t in turns] == [("user", "complete"), ("assistant", "interrupted")]

        await eventually(interrupted, within=10)


async def test_a_cancel_left_for_a_silent_owner_stops_its_reply_when_it_wakes(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # The owner is alive but does not answer (stopped, as a process paused or between two subscriptions is):
    # the cancel is left in Redis, the owner finds it when it runs again, and the answer agrees with history.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="8")
    redis = Redis.from_url(redis_server.url)
    received = ""
    answer: httpx.Response | None = None
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)

        async def read() -> None:
            nonlocal received
            async with chat(client, a, session_id, " ".join(f"z{i}" for i in range(400))) as response:
                async for chunk in response.aiter_text():
                    received += chunk

        async def cancel() -> None:
            nonlocal answer
            answer = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id})

        assert a.process is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await eventually(lambda: _true(len(received.split()) >= 2))
            a.process.send_signal(signal.SIGSTOP)
            try:
                tg.start_soon(cancel)
                await eventually(lambda: _true(bool(redis.keys("parley:{*}:cancel-left:*"))), within=10)
            finally:
                a.process.send_signal(signal.SIGCONT)
        redis.close()
    assert answer is not None and answer.status_code == 200, answer
    assert answer.json()["cancelled"] is True
    assert len(received.split()) < 400
    async with httpx.AsyncClient(timeout=10) as client:
        turns = await history(client, b.url, session_id)
    assert (turns[-1]["status"], turns[-1]["content"]) == ("cancelled", received)


_HANDSHAKE = ("HELLO", "PING")


@pytest.mark.parametrize("limit", [None, 2])
async def test_a_short_chat_is_two_round_trips_to_redis(
    live: Callable[..., Any], redis_server: RedisServer, limit: int | None
) -> None:
    # What MONITOR shows of one short chat: a script that begins it and one that ends it, nothing else (with a
    # per-owner limit too: the slot rides in the same scripts). Commands run inside a script are the "lua" client's.
    async with live(redis_url=redis_server.url, max_streams_per_owner=limit).client() as client:
        session_id = (await client.post("/api/v1/sessions")).json()["ui_session_id"]
        assert (await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "warm"})).text == "warm"
        seen: list[dict[str, Any]] = []
        ready = anyio.Event()
        token = anyio.lowlevel.current_token()

        def watch() -> None:
            with Redis.from_url(redis_server.url, decode_responses=True) as redis, redis.monitor() as monitor:
                redis.echo("parley-test-start")
                for command in monitor.listen():
                    text = command["command"]
                    if text == "ECHO parley-test-start":
                        anyio.from_thread.run_sync(ready.set, token=token)
                    elif text == "ECHO parley-test-end":
                        return
                    # (Not counted: what runs inside a script, a connection's handshake, such as this test's own for
                    # its end marker, and the health check of a connection idle for a while.)
                    elif ready.is_set() and command.get("client_type") != "lua" and text.split()[0] not in _HANDSHAKE:
                        seen.append(command)

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, watch)
            await ready.wait()
            answer = await client.post("/api/v1/chat", data={"ui_session_id": session_id, "message": "hello"})
            assert answer.text == "hello"
            with Redis.from_url(redis_server.url) as redis:
                redis.echo("parley-test-end")
    assert [command["command"].split()[0] for command in seen] == ["EVALSHA", "EVALSHA"], seen
    assert all(f"{{{session_id}}}" in command["command"] for command in seen)


async def test_a_record_that_reads_final_never_changes_after_an_outage_longer_than_the_lease(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Issue 24 §1. Redis goes away while A streams and stays away longer than the lease: A stops its reply and
    # keeps its text to record. Once Redis is back, a reader polling history (on both workers, whose requests also
    # look for orphans) must never see the reply final with any text but the one the client received: nobody
    # marks it interrupted while its owner, alive, may still record it, and its owner records it promptly.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="2")
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        # Longer than the lease: A's claim runs out in Redis's eyes meanwhile.
        received = await _redis_down_while_streaming(client, a, session_id, redis_server, down_for=4.5)
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for server in (b, a):
                answer = await client.get(f"{server.url}/api/v1/sessions/{session_id}/messages")
                if answer.status_code != 200:
                    continue
                turns = answer.json()["messages"]
                if turns[1]["status"] != "streaming":
                    seen.append((turns[1]["status"], turns[1]["content"]))
            if len(seen) >= 10:
                break
        assert seen, "the reply was never recorded"
        assert seen[0] == ("interrupted", received), (seen[0], len(received))
        assert all(record == seen[0] for record in seen)


async def test_a_redis_stall_shorter_than_the_lease_does_not_stop_a_reply(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Issue 24 §3.5. Redis stalls (SIGSTOP: connections hang, nothing is refused) for less than the lease: the
    # renewal in flight must not wait out a socket timeout longer than the lease; renewals retry within the lease,
    # and the reply goes on to complete.
    # As in the issue, with a lease of 12 s: Redis stalled from just before the first renewal (due at 4 s) for
    # longer than the 5 s socket timeout, back about 1.4 s before the owner's stop (at 10.8 s; renewals are tried
    # every 1.8 s at most, and a loaded machine needs the rest) and well before the claim runs out (12 s). (With
    # the 10 s lease, the margin was 0.4 s, less than a retry's period: it failed on a loaded machine.)
    a, _ = pair(subprocesses, tmp_path, redis_server, PARLEY_REDIS_LEASE_SECONDS="12")
    message = " ".join(f"z{i}" for i in range(300))  # 15 s of stream
    assert redis_server.process is not None
    async with httpx.AsyncClient(timeout=30) as client:
        session_id = await session_on(client, a)
        received = ""

        async def follow() -> None:
            nonlocal received
            async with chat(client, a, session_id, message) as response:
                async for chunk in response.aiter_text():
                    received += chunk

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await eventually(lambda: _true(len(received.split()) >= 76), within=10)  # 3.8 s in, or later
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                await anyio.sleep(5.6)  # a stall, not a wait for a condition: shorter than the lease
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
        assert received == message

        async def complete() -> bool:
            turns = await history(client, a.url, session_id)
            return turns[1]["status"] != "streaming"

        await eventually(complete, within=10)
        turns = await history(client, a.url, session_id)
        assert (turns[1]["status"], turns[1]["content"]) == ("complete", message)


ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


async def test_another_owners_cancel_does_not_ask_the_process_streaming_the_session(
    subprocesses: Callable[..., Subprocess], tmp_path: Path, redis_server: RedisServer
) -> None:
    # Issue 24 §3.10. Bob's cancel of Alice's session must take the same time whether or not it streams on the
    # other worker: it must not go through the cancel bus (a PUBLISH to A and a wait for A's answer) when the
    # session is not his, but be answered from the same reads as for a session that streams nowhere.
    a, b = pair(subprocesses, tmp_path, redis_server, PARLEY_API_KEYS=f"alice:{ALICE},bob:{BOB}")
    alice, bob = {"authorization": f"Bearer {ALICE}"}, {"authorization": f"Bearer {BOB}"}
    redis = Redis.from_url(redis_server.url, decode_responses=True)

    def published() -> int:
        return int(redis.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))

    async with httpx.AsyncClient(timeout=30) as client:
        streaming = (await client.post(f"{a.url}/api/v1/sessions", headers=alice)).json()["ui_session_id"]
        idle = (await client.post(f"{a.url}/api/v1/sessions", headers=alice)).json()["ui_session_id"]
        data = {"ui_session_id": streaming, "message": " ".join(f"v{i}" for i in range(400))}
        async with client.stream("POST", f"{a.url}/api/v1/chat", data=data, headers=alice) as response:
            chunks = response.aiter_text()
            assert await anext(chunks)
            before = published()
            for session_id in (streaming, idle):
                answer = await client.post(f"{b.url}/api/v1/cancel", data={"ui_session_id": session_id}, headers=bob)
                assert answer.status_code == 404, answer.text
            assert published() == before
            # Alice's reply goes on.
            assert (await client.get(f"{b.url}/api/v1/sessions/{streaming}", headers=alice)).json()[
                "status"
            ] == "streaming"
    redis.close()


async def test_a_follow_request_that_comes_before_the_replys_start_is_mirrored(shared_redis_url: str) -> None:
    # Issue 24 §3.7. A rejoin that reaches the owner's process between its claim and the start of its reply (no
    # message id yet) used to be ignored: the follower waited 3 s for a mirror and answered 500 "its process did
    # not answer". The owner mirrors the reply once it starts.
    import secrets

    from parley.sessions.interactions import Interaction, Interactions
    from parley.sessions.redis import connect
    from parley.sessions.redis_coordinator import RedisCoordinator

    redis = connect(shared_redis_url)
    coordinator = RedisCoordinator(redis, prefix=f"test-{secrets.token_hex(6)}:")
    interaction = Interaction("s1")

    class Running:
        def get(self, session_id: str) -> Interaction | None:
            return interaction if session_id == "s1" else None

    key = coordinator.rejoin.frames_key(interaction)
    try:
        async with anyio.create_task_group() as tg:
            request = {"follow": interaction.id, "session": "s1"}
            coordinator.rejoin.on_follow(request, cast(Interactions, Running()), tg)
            await anyio.sleep(0.1)
            interaction.message_id = "msg_1"  # the reply starts
            interaction.add("hello")
            interaction.finish("complete")

            async def mirrored() -> bool:
                frames = await redis.xrange(key)
                return [sorted(fields) for _, fields in frames] == [["m"], ["t"], ["e", "s"]]

            await eventually(mirrored)
    finally:
        await redis.delete(key)
        await redis.aclose()


async def test_a_follower_ignores_the_copy_an_owner_restarts_into_the_same_stream(shared_redis_url: str) -> None:
    # Issue 24 §3.3. After a blip, a new follow request makes the owner write its mirror again from the first token
    # into the same Redis stream: a follower already reading it must not add that text twice.
    import secrets

    from parley.sessions.redis import connect
    from parley.sessions.redis_coordinator import RedisCoordinator
    from parley.sessions.redis_rejoin import _Copy

    redis = connect(shared_redis_url)
    coordinator = RedisCoordinator(redis, prefix=f"test-{secrets.token_hex(6)}:")
    copy = _Copy(coordinator.rejoin, "s1", "int_1")
    try:
        for fields in ({"m": "msg_1"}, {"t": "a "}, {"t": "b "}, {"m": "msg_1"}, {"t": "a "}, {"t": "b "}, {"t": "c"}):
            await redis.xadd(copy.key, fields)
        await redis.xadd(copy.key, {"s": "complete", "e": ""})
        answer = await redis.xread({copy.key: "0-0"})
        copy.add(answer[0][1])
        assert ("".join(copy.mirror.tokens), copy.mirror.status) == ("a b c", "complete")
    finally:
        await redis.delete(copy.key)
        await redis.aclose()
