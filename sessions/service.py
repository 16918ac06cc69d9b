"""The parts of one parley app, put together from its settings: what every route shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from agents import Agent, Agents, EchoAgent, OpenAIAgent, UnknownAgent
from sessions.errors import ApiError
from sessions.files import Blobs
from sessions.interactions import Coordinator, Interactions
from sessions.sqlite import SQLiteStore
from sessions.store import Store
from settings import Settings, SettingsError

logger = logging.getLogger("parley")

_SHUTDOWN_PATIENCE = 5.0


@dataclass
class Parley:
    """Everything the routes share: the settings, the store, the agents and the interactions in progress."""

    settings: Settings
    store: Store
    agents: Agents
    blobs: Blobs
    interactions: Interactions = field(default_factory=Interactions)
    _ready: bool = False
    _ready_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def coordinator(self) -> Coordinator | None:
        """What carries the rules across processes (Redis), if anything: the interactions' own."""
        return self.interactions.coordinator

    async def ready(self) -> Parley:
        # Opened on first use, not in the lifespan: a parent app does not run a mounted app's lifespan.
        if not self._ready:
            async with self._ready_lock:
                if not self._ready:
                    await self.store.open()
                    await self.blobs.open()
                    if self.coordinator is None:
                        # Embedded: turns left "streaming" by a process that died cannot finish any more.
                        # (On Redis, leases tell which owners are gone: see settle() and the sweeper.)
                        await self.store.interrupt_turns()
                    self._ready = True
        return self

    async def settle(self, session_id: str) -> None:
        """On Redis: record the session's turns whose process died (its lease ran out) as interrupted."""
        if self.coordinator is not None:
            await self.store.interrupt_turns(session_id)

    async def streaming_elsewhere(self, session_id: str, interaction_id: str | None) -> bool:
        """Embedded store only: is the session's reply being streamed by another worker process?"""
        if self.coordinator is not None or self.interactions.get(session_id) is not None:
            return False
        streaming = await self.store.streaming_turn(session_id)
        return streaming is not None and interaction_id in (None, streaming)

    async def run_background(self) -> None:
        """What a Redis-backed process runs beside its requests: the cancel listener and the lease sweeper."""
        if self.coordinator is None:
            return
        async with anyio.create_task_group() as tg:
            await tg.start(self.coordinator.listen, self.interactions.cancel_here)
            while True:
                await anyio.sleep(self.settings.redis_lease_seconds)
                try:
                    await self.store.interrupt_turns()
                except ApiError:
                    logger.warning("lease sweeper: the store is unavailable; will retry")

    async def close(self) -> None:
        # A server that gives up waiting for streams at shutdown (uvicorn --timeout-graceful-shutdown)
        # cancels them and then runs the lifespan's end: let their last words reach the store before it closes.
        with anyio.move_on_after(_SHUTDOWN_PATIENCE):
            await self.interactions.wait_until_idle()
        await self.agents.aclose()
        await self.store.close()
        self.blobs.close()


def build(settings: Settings, store: Store | None = None, agents: Agents | None = None) -> Parley:
    """Parley on the embedded defaults (SQLite, echo), on Redis when ``PARLEY_REDIS_URL`` is set, or on
    the store and agents given."""
    store, coordinator = _store_and_coordinator(settings, store)
    return Parley(
        settings, store, agents or default_agents(settings), default_blobs(settings), Interactions(coordinator)
    )


def default_agents(settings: Settings) -> Agents:
    agents: list[Agent] = [EchoAgent(delay=settings.echo_delay)]
    if settings.openai_base_url:
        openai = OpenAIAgent(
            settings.openai_base_url,
            settings.openai_model,
            api_key=settings.openai_api_key,
            system_prompt=settings.openai_system_prompt,
            connect_timeout=settings.openai_connect_timeout,
            read_timeout=settings.openai_read_timeout,
            history_limit=settings.openai_history_messages,
        )
        agents.append(openai)
    try:
        return Agents(agents, default=settings.agent)
    except UnknownAgent:
        raise SettingsError(f"PARLEY_AGENT={settings.agent!r} names no configured agent") from None


def default_store(settings: Settings) -> Store:
    if settings.data_dir == ":memory:":
        return SQLiteStore(":memory:")
    return SQLiteStore(f"{settings.data_dir}/parley.db")


def _store_and_coordinator(settings: Settings, store: Store | None) -> tuple[Store, Coordinator | None]:
    if not settings.redis_url:
        return store or default_store(settings), None
    # Imported here: redis-py is an optional extra (parley[redis]), needed only when Redis is configured.
    from sessions.redis import RedisCoordinator, RedisStore, connect

    redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_seconds)
    return store or RedisStore(redis), RedisCoordinator(redis, lease_seconds=settings.redis_lease_seconds)


def default_blobs(settings: Settings) -> Blobs:
    return Blobs(None if settings.data_dir == ":memory:" else f"{settings.data_dir}/files")
