"""The connection that chats pipeline their turn's scripts on (sessions/redis_pipe.py), against a real redis-server:
replies reach the callers that wait for them, whatever a caller that gave up, a timeout or a restart did."""

from __future__ import annotations

import anyio
import pytest
from redis import exceptions as redis_errors

from parley.sessions.redis import connect
from parley.sessions.redis_pipe import Pipe, pipe_of
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio

# Answers ARGV[2] after keeping Redis busy for ARGV[1] milliseconds.
SLOW = """
local function now() local t = redis.call('TIME') return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 end
local start = now()
repeat until now() - start >= tonumber(ARGV[1])
return ARGV[2]
"""


def pipe_on(server: RedisServer, timeout: float = 5.0) -> Pipe:
    return Pipe("127.0.0.1", server.port, 0, None, None, timeout, 2.0)


async def test_a_caller_that_gives_up_leaves_the_replies_in_step(redis_server: RedisServer) -> None:
    pipe = pipe_on(redis_server)
    try:
        with anyio.move_on_after(0.05) as scope:
            await pipe.call("EVAL", SLOW, 0, 300, "first")
        assert scope.cancelled_caught
        # Sent after the first, answered after it: its own reply, not the one its predecessor left.
        assert await pipe.call("ECHO", "second") == "second"
        async with anyio.create_task_group() as task_group:
            answers: dict[int, str] = {}

            async def echo(n: int) -> None:
                answers[n] = await pipe.call("ECHO", f"n{n}")

            for n in range(50):
                task_group.start_soon(echo, n)
        assert answers == {n: f"n{n}" for n in range(50)}
    finally:
        pipe.close()


async def test_no_reply_within_the_timeout_fails_and_the_next_call_connects_again(redis_server: RedisServer) -> None:
    pipe, patient = pipe_on(redis_server, timeout=0.1), pipe_on(redis_server)
    try:
        with pytest.raises(redis_errors.TimeoutError):
            await pipe.call("EVAL", SLOW, 0, 300, "late")
        assert await patient.call("ECHO", "done") == "done"  # (answered once the slow script is over)
        assert await pipe.call("ECHO", "next") == "next"
    finally:
        pipe.close()
        patient.close()


async def test_a_script_runs_again_after_redis_restarts(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    pipe = pipe_of(client)
    assert pipe is not None
    script = client.register_script("return ARGV[1] .. KEYS[1]")
    try:
        assert await pipe.script(script, ["k"], ["a"]) == "ak"
        redis_server.stop()
        with pytest.raises((redis_errors.ConnectionError, OSError)):
            await pipe.script(script, ["k"], ["b"])
        redis_server.start()  # with no scripts loaded: EVALSHA answers NOSCRIPT, and the script is sent again
        assert await pipe.script(script, ["k"], ["c"]) == "ck"
        with pytest.raises(redis_errors.ResponseError):
            await pipe.call("NOSUCHCOMMAND")
        assert await pipe.call("ECHO", "after an error") == "after an error"
    finally:
        pipe.close()
        await client.aclose()


async def test_clients_the_pipe_does_not_speak_for_have_none(redis_server: RedisServer) -> None:
    for url in (f"rediss://127.0.0.1:{redis_server.port}/0", "unix:///nowhere.sock"):
        client = connect(url)
        assert pipe_of(client) is None
        await client.aclose()


async def test_the_pipe_speaks_to_its_database_and_refuses_what_redis_refuses(redis_server: RedisServer) -> None:
    client = connect(f"redis://127.0.0.1:{redis_server.port}/3")
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        await pipe.call("SET", "where", "three")
        assert await client.get("where") == "three"
        other = connect(redis_server.url)
        assert await other.get("where") is None  # (database 0)
        await other.aclose()
    finally:
        pipe.close()
        await client.aclose()
    wrong = connect(f"redis://:no-such-password@127.0.0.1:{redis_server.port}/0")
    refused = pipe_of(wrong)
    assert refused is not None
    with pytest.raises(redis_errors.RedisError):  # (this Redis has no password: AUTH is refused)
        await refused.call("PING")
    refused.close()
    await wrong.aclose()


async def test_errors_read_as_redis_py_reads_them(redis_server: RedisServer) -> None:
    # A Redis that restarts answers LOADING while it reads its data back: that is Redis not there yet (a
    # ConnectionError, which the store's last write of a reply waits out), not a failed command. (The script only
    # makes Redis send the same error line.)
    pipe = pipe_on(redis_server)
    try:
        with pytest.raises(redis_errors.ConnectionError):
            await pipe.call("EVAL", "return redis.error_reply('LOADING Redis is loading the dataset in memory')", 0)
        with pytest.raises(redis_errors.ResponseError) as refused:
            await pipe.call("EVAL", "return redis.error_reply('ERR not this')", 0)
        assert not isinstance(refused.value, redis_errors.ConnectionError)
    finally:
        pipe.close()
