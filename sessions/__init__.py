"""The server's domain, with no HTTP in it: conversations and how each one's reply is driven. (The web layer that
serves it, routes, wire formats, errors to statuses, telemetry, is :mod:`parley` around it.)

- :mod:`sessions.store`: the store interface (sessions, history, file metadata) and its records;
  :mod:`sessions.sqlite` is the embedded implementation, :mod:`sessions.redis` the shared one.
- :mod:`sessions.interactions`: the interactions in progress, one cancel scope each, one per session, and the
  coordinator interface (claims, cancels, rejoins across processes) with its local implementation;
  :mod:`sessions.redis_coordinator` carries them across processes on Redis: claims (:mod:`sessions.redis_claims`),
  cancels (:mod:`sessions.redis_cancels`) and rejoins (:mod:`sessions.redis_rejoin`), with their Lua scripts in
  :mod:`sessions.redis_scripts`.
- :mod:`sessions.postgres`: the PostgreSQL store (asyncio only), with :mod:`sessions.postgres_schema` (its
  migrations), :mod:`sessions.postgres_blobs` (files' bytes in the database) and :mod:`sessions.postgres_import`
  (moving an SQLite history in).
- :mod:`sessions.turns`: the turn runner (claim, history, agent, checkpoints, record, release), with no wire format;
  the busy policy (what a message to a session that is already answering gets) lives where it takes the claim.
- :mod:`sessions.limits` and :mod:`sessions.redis_limits`: how many replies one owner may have running at once,
  in one process and across processes on Redis (owners themselves: see ``parley/auth.py``).
- :mod:`sessions.files`: uploaded files' bytes, streamed to disk (the ``Blobs`` interface and its disk
  implementation).
- :mod:`sessions.errors`: every failure the domain raises, as one tree (:mod:`parley.errors` maps them to HTTP).
"""

from __future__ import annotations

from parley.sessions.interactions import Interaction, Interactions
from parley.sessions.sqlite import SQLiteStore
from parley.sessions.store import FileInfo, Message, Session, Store

__all__ = ["FileInfo", "Interaction", "Interactions", "Message", "SQLiteStore", "Session", "Store"]
