"""The parts of one parley app, put together from its settings: what every route shares."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from parley.agents import Agents, configured
from parley.sessions.coordinator import Coordinator, LocalCoordinator
from parley.sessions.files import Blobs, DiskBlobs
from parley.sessions.interactions import Interactions
from parley.sessions.limits import LocalStreamSlots, StreamSlots
from parley.sessions.sqlite import SQLiteStore
from parley.sessions.store import Store
from parley.sessions.turns import TurnObserver, TurnRunner
from parley.settings import Settings, SettingsError

if TYPE_CHECKING:
    from parley.sessions.postgres import PostgresStore
    from parley.sessions.redis_coordinator import Detached

logger = logging.getLogger("parley")

_SHUTDOWN_PATIENCE = 5.0


@dataclass
class Parley:
    """Everything the routes share: the settings, the store, the agents, the interactions in progress and the
    turn runner."""

    settings: Settings
    store: Store
    agents: Agents
    blobs: Blobs
    interactions: Interactions
    observers: list[TurnObserver] = field(default_factory=list)
    runner: TurnRunner = field(init=False)
    _ready: bool = False
    _ready_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Whether parley's own lifespan runs what the process runs beside its requests (run_background); a host app
    # that mounts parley may not run it, and then the first request starts it (see ready).
    in_lifespan: bool = False
    _detached: Detached | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        self.runner = TurnRunner(
            self.store,
            self.interactions,
            self.agents,
            self.observers,
            settings.checkpoint_seconds,
            settings.record_before_end_seconds,
        )

    @property
    def coordinator(self) -> Coordinator:
        """What carries the rules across processes: local, or Redis."""
        return self.interactions.coordinator

    async def ready(self) -> Parley:
        # Opened on first use, not in the lifespan: a parent app does not run a mounted app's lifespan.
        if not self._ready:
            async with self._ready_lock:
                if not self._ready:
                    if self.settings.redis_url:
                        from parley.sessions.redis import require_asyncio  # (an optional extra: imported here)

                        require_asyncio()
                    await self.store.open()
                    await self.blobs.open()
                    await self.coordinator.interrupt_orphans(self.store)
                    if not self.in_lifespan and self.settings.redis_url:
                        # Nothing else would listen for the cancels and rejoins that other processes send here.
                        from parley.sessions.redis_coordinator import Detached

                        self._detached = Detached(self.run_background)
                    self._ready = True
        return self

    async def interrupt_orphans(self, session_id: str) -> None:
        """Record as interrupted the session's turns whose process died (on Redis: whose lease ran out)."""
        await self.coordinator.interrupt_orphans(self.store, session_id)

    async def run_background(self) -> None:
        """What the process runs beside its requests: the checkpoints of its replies in progress (with Redis also:
        the cancel listener, the lease sweeper, and the renewal of its stream slots when streams per owner are
        limited)."""
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self.runner.run_checkpoints)
            task_group.start_soon(self.interactions.slots.keep_alive)
            await self.coordinator.run(self.interactions, self.store)

    async def close(self) -> None:
        if self._detached is not None:
            await self._detached.aclose()
        # A server that gives up waiting for streams at shutdown (uvicorn --timeout-graceful-shutdown)
        # cancels them and then runs the lifespan's end: let their last words reach the store before it closes.
        with anyio.move_on_after(_SHUTDOWN_PATIENCE):
            await self.interactions.wait_until_idle()
        await self.agents.aclose()
        await self.store.close()
        self.blobs.close()


def build(
    settings: Settings,
    store: Store | None = None,
    agents: Agents | None = None,
    observers: Sequence[TurnObserver] = (),
) -> Parley:
    """Parley on the embedded defaults (SQLite, echo), on PostgreSQL when ``PARLEY_DATABASE_URL`` is set, on
    Redis (as the coordinator, and as the store without a database) when ``PARLEY_REDIS_URL`` is, or on the store
    and agents given. Raises SettingsError for a database URL that cannot work, or without parley[postgres]."""
    blobs: Blobs | None = None
    postgres = None
    if store is None and settings.database_url:
        store = postgres = _postgres(settings)
        blobs = _postgres_blobs(postgres)
    store, coordinator, slots = _store_and_coordinator(settings, store)
    if postgres is not None and settings.redis_url:
        # Data in PostgreSQL, claims in Redis: the store asks the coordinator which turns are alive.
        postgres.claims = _claims_in(coordinator)
    return Parley(
        settings,
        store,
        agents or configured(settings),
        blobs or default_blobs(settings),
        Interactions(coordinator, slots, max_queued=settings.max_queued),
        list(observers),
    )


def _postgres(settings: Settings) -> PostgresStore:
    assert settings.database_url is not None
    try:
        # Imported here: psycopg is an optional extra (parley[postgres]), needed only when a database is configured.
        from parley.sessions.postgres import PostgresStore, connect
    except ImportError as exc:
        raise SettingsError(
            f"PARLEY_DATABASE_URL needs parley[postgres] installed (pip install 'parley[postgres]'): {exc}"
        ) from None
    try:
        pool = connect(settings.database_url, settings.database_max_connections, settings.database_pool_timeout_seconds)
    except ValueError as exc:
        raise SettingsError(f"PARLEY_DATABASE_URL {exc}") from None
    return PostgresStore(pool)


def _postgres_blobs(store: PostgresStore) -> Blobs:
    from parley.sessions.postgres_blobs import PostgresBlobs

    return PostgresBlobs(store)


def default_store(settings: Settings) -> Store:
    if settings.data_dir == ":memory:":
        return SQLiteStore(":memory:")
    return SQLiteStore(f"{settings.data_dir}/parley.db")


def _store_and_coordinator(settings: Settings, store: Store | None) -> tuple[Store, Coordinator, StreamSlots]:
    limit = settings.max_streams_per_owner
    if not settings.redis_url:
        store = store or default_store(settings)
        return store, LocalCoordinator(store), LocalStreamSlots(limit)
    # Imported here: redis-py is an optional extra (parley[redis]), needed only when Redis is configured.
    from parley.sessions.redis import RedisStore, connect
    from parley.sessions.redis_coordinator import RedisCoordinator
    from parley.sessions.redis_limits import RedisStreamSlots

    redis = connect(
        settings.redis_url,
        settings.redis_max_connections,
        settings.redis_pool_timeout_seconds,
        cluster=settings.redis_cluster,
        socket_timeout=settings.redis_socket_timeout_seconds,
    )
    # One connection apart from the pool, for the reader of the replies this process's rejoins follow: followers,
    # however many, never take a connection that requests need (see sessions/redis_rejoin.py).
    reader = connect(
        settings.redis_url,
        1,
        settings.redis_pool_timeout_seconds,
        cluster=settings.redis_cluster,
        socket_timeout=settings.redis_socket_timeout_seconds,
    )
    lease = settings.redis_lease_seconds
    store = store or RedisStore(redis)
    coordinator = RedisCoordinator(redis, lease_seconds=lease, reader=reader, store=store)
    return store, coordinator, RedisStreamSlots(redis, limit, lease_seconds=lease)


def _claims_in(coordinator: Coordinator) -> Callable[[Collection[str]], Awaitable[Mapping[str, str]]]:
    from parley.sessions.redis_coordinator import RedisCoordinator

    assert isinstance(coordinator, RedisCoordinator)

    async def claims(session_ids: Collection[str]) -> Mapping[str, str]:
        held = {}
        for session_id in session_ids:  # (only sessions with a turn left streaming: rare, and few)
            owner = await coordinator.claims.owner(session_id)
            if owner is not None:
                held[session_id] = owner[1]
        return held

    return claims


def default_blobs(settings: Settings) -> Blobs:
    return DiskBlobs(None if settings.data_dir == ":memory:" else f"{settings.data_dir}/files")
