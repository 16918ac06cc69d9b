"""Sessions: where conversations live, and how each one's interaction in progress is driven and coordinated. The
web layer around them (requests, responses, wire formats, operations) is in :mod:`parley`.

- :mod:`.store`: the store interface (sessions, history, file records) and its records; :mod:`.sqlite` is the
  embedded implementation, :mod:`.redis` and :mod:`.postgres` the shared ones (PostgreSQL with its migrations,
  :mod:`.postgres_schema`, its files' bytes, :mod:`.postgres_blobs`, and the import of an SQLite history,
  :mod:`.postgres_import`).
- :mod:`.files`: files' bytes (the ``Blobs`` interface and its disk implementation).
- :mod:`.interactions`: the interactions in progress, one cancel scope each, one per session, and the busy policy
  (what a message to a session already answering one gets), decided where the interaction takes its claim.
- :mod:`.coordinator`: the coordinator interface (claims, cancels, rejoins, lines of waiting messages across
  processes) with its local implementation; :mod:`.redis_coordinator` carries them across processes on Redis:
  claims (:mod:`.redis_claims`), cancels (:mod:`.redis_cancels`), rejoins (:mod:`.redis_rejoin`) and lines
  (:mod:`.redis_queue`), with their keys in :mod:`.redis_keys` and their Lua scripts in :mod:`.redis_scripts`;
  :mod:`.redis_migrate` moves data from before the keys had hash tags.
- :mod:`.turns`: the turn runner (claim, history, agent, checkpoints, record, release), with no wire format.
- :mod:`.parts`: a reply's parts (the AI SDK's UIMessage parts) folded from the agent's events, and its usage.
- :mod:`.limits` and :mod:`.redis_limits`: how many replies one owner may have running at once, in one process and
  across processes on Redis (owners themselves: see :mod:`parley.auth`).
- :mod:`.errors`: every failure the domain raises, as one tree (:mod:`parley.errors` maps them to HTTP).
"""

from __future__ import annotations

from parley.sessions.interactions import Interaction, Interactions
from parley.sessions.sqlite import SQLiteStore
from parley.sessions.store import FileInfo, Message, Session, Store

__all__ = ["FileInfo", "Interaction", "Interactions", "Message", "SQLiteStore", "Session", "Store"]
