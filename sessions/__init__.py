"""Sessions: where conversations live and how each one's interaction in progress is driven.

- :mod:`sessions.store`: the store interface (sessions, history, file metadata) and its records;
  :mod:`sessions.sqlite` is the embedded implementation.
- :mod:`sessions.interactions`: the interactions in progress, one cancel scope each, one per session, and the
  coordinator interface (claims, cancels, rejoins across processes) with its local implementation.
- :mod:`sessions.turns`: the turn runner (claim, history, agent, checkpoints, record, release), with no wire format.
- :mod:`sessions.streaming` and :mod:`sessions.sse`: the chat response and its renderers (plain text, the AI SDK's
  SSE); :mod:`sessions.rejoin`: following a reply that is running.
- :mod:`sessions.limits` and :mod:`sessions.redis_limits`: how many replies one owner may have running at once,
  in one process and across processes on Redis (owners themselves: see ``auth.py``).
- :mod:`sessions.files` and :mod:`sessions.uploads`: uploaded files' bytes, streamed to disk (the ``Blobs``
  interface and its disk implementation).
- :mod:`sessions.redis` and :mod:`sessions.redis_coordinator`: the Redis store, and the coordinator that carries
  claims (:mod:`sessions.redis_claims`), cancels (:mod:`sessions.redis_cancels`) and rejoins
  (:mod:`sessions.redis_rejoin`) across processes; their Lua scripts are in :mod:`sessions.redis_scripts`.
- :mod:`sessions.postgres`: the PostgreSQL store (asyncio only), with :mod:`sessions.postgres_schema` (its
  migrations), :mod:`sessions.postgres_blobs` (files' bytes in the database) and :mod:`sessions.postgres_import`
  (moving an SQLite history in).
- :mod:`sessions.service`: the parts of one app (store, agents, interactions) put together from its settings.
- :mod:`sessions.errors`: every failure the domain raises, as one tree (:mod:`parley.errors` maps them to HTTP).
- Operations: :mod:`sessions.openapi` (the OpenAPI document), :mod:`sessions.metrics` (Prometheus),
  :mod:`sessions.logs` (log formats, the per-interaction line), :mod:`sessions.telemetry` (each request's id,
  metrics and 5xx line), :mod:`sessions.health` (readiness), :mod:`sessions.collector` (the garbage collector's
  settings when parley owns its process).
"""

from __future__ import annotations

from parley.sessions.interactions import Interaction, Interactions
from parley.sessions.sqlite import SQLiteStore
from parley.sessions.store import FileInfo, Message, Session, Store

__all__ = ["FileInfo", "Interaction", "Interactions", "Message", "SQLiteStore", "Session", "Store"]
