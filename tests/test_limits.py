"""The per-owner stream slots: the same contract in one process and on Redis, and Redis's leases."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from parley.sessions.limits import LocalStreamSlots, StreamSlots
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", "redis"])
async def make_slots(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., StreamSlots]]:
    made: list[StreamSlots] = []
    prefix = f"test-{secrets.token_hex(6)}:"

    def make(limit: int | None, lease_seconds: float = 10.0) -> StreamSlots:
        slots: StreamSlots
        if request.param == "local":
            slots = LocalStreamSlots(limit)
        else:
            from parley.sessions.redis import connect
            from parley.sessions.redis_limits import RedisStreamSlots

            url = request.getfixturevalue("shared_redis_url")
            slots = RedisStreamSlots(connect(url), limit, prefix=prefix, lease_seconds=lease_seconds)
        made.append(slots)
        return slots

    yield make
    for slots in made:
        redis = getattr(slots, "redis", None)
        if redis is not None:
            await redis.aclose()


async def test_an_owner_gets_at_most_limit_slots(make_slots: Callable[..., StreamSlots]) -> None:
    slots = make_slots(2)
    assert await slots.take("alice", "int_1") is True
    assert await slots.take("alice", "int_2") is True
    assert await slots.take("alice", "int_3") is False
    assert await slots.take("bob", "int_4") is True  # each owner has slots of their own
    await slots.give_back("alice", "int_1")
    await slots.give_back("alice", "int_1")  # only the first call frees anything
    assert await slots.take("alice", "int_5") is True
    assert await slots.take("alice", "int_6") is False
    await slots.give_back("alice", "int_never_taken")
    assert await slots.take("alice", "int_7") is False


async def test_no_limit_takes_nothing(make_slots: Callable[..., StreamSlots]) -> None:
    slots = make_slots(None)
    assert all([await slots.take("alice", f"int_{i}") for i in range(100)])
    await slots.give_back("alice", "int_1")
    await slots.keep_alive()  # returns at once: there is nothing to keep


async def test_redis_slots_are_shared_by_processes_and_a_dead_ones_run_out(shared_redis_url: str) -> None:
    from parley.sessions import redis_keys
    from parley.sessions.redis import connect
    from parley.sessions.redis_limits import RedisStreamSlots

    prefix = f"test-{secrets.token_hex(6)}:"
    alive = RedisStreamSlots(connect(shared_redis_url), 2, prefix=prefix, lease_seconds=0.3)
    dead = RedisStreamSlots(connect(shared_redis_url), 2, prefix=prefix, lease_seconds=0.3)
    other = RedisStreamSlots(connect(shared_redis_url), 2, prefix=prefix, lease_seconds=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(alive.keep_alive)  # live processes renew their slots; the dead one does not
        tg.start_soon(other.keep_alive)
        assert await alive.take("alice", "int_alive") is True
        assert await dead.take("alice", "int_dead") is True
        assert await other.take("alice", "int_x") is False  # two processes' slots count together
        with anyio.fail_after(10):
            while not await other.take("alice", "int_x"):
                await anyio.sleep(0.05)
        # The dead process's slot ran out; the live ones' hold through several leases: once both have been renewed
        # to run out two leases after the latest of them did when the dead one ran out, there is still no room.
        key = redis_keys.owner_streams(prefix, "alice")
        then = max(score for _, score in await other.redis.zrange(key, 0, -1, withscores=True))

        async def renewed_twice() -> bool:
            scores = dict(await other.redis.zrange(key, 0, -1, withscores=True))
            return all(scores.get(held, 0) >= then + 2 * other.lease_ms for held in ("int_alive", "int_x"))

        await eventually(renewed_twice, within=10)
        assert await other.take("alice", "int_y") is False
        tg.cancel_scope.cancel()
    for slots in (alive, dead, other):
        await slots.redis.aclose()
