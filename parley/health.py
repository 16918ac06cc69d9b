"""Readiness: can this process serve requests right now? (Liveness, ``/healthz``, only says that it runs.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from parley.service import Parley

READY_WITHIN = 1.0


async def readiness(parley: Parley) -> dict[str, str]:
    """Each dependency and how it answered: ``"ok"``, or why not. The store is asked for one session; on
    Redis, the coordinator for a claim. Each has :data:`READY_WITHIN` seconds, and they are asked at once."""
    # The store is named for what it is when it is a server of its own (PostgreSQL).
    store = "postgres" if parley.settings.database_url else "store"
    probes: dict[str, Callable[[], Awaitable[object]]] = {store: lambda: _store(parley)}
    if parley.settings.redis_url:
        probes["redis"] = lambda: parley.coordinator.streaming_elsewhere("parley-readiness-probe", None)
    checks: dict[str, str] = {}

    async def probe(name: str, check: Callable[[], Awaitable[object]]) -> None:
        try:
            with anyio.fail_after(READY_WITHIN):
                await check()
        except TimeoutError:
            checks[name] = f"no answer within {READY_WITHIN:g} s"
        except Exception as exc:  # whatever it is, the answer is "not ready", with its reason
            checks[name] = str(exc) or type(exc).__name__
        else:
            checks[name] = "ok"

    async with anyio.create_task_group() as tg:
        for name, check in probes.items():
            tg.start_soon(probe, name, check)
    return {name: checks[name] for name in probes}


async def _store(parley: Parley) -> None:
    await parley.ready()
    await parley.store.list_sessions("parley-readiness-probe", 1, 0)  # an owner with no sessions: a cheap read
