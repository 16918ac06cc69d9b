"""The garbage collector's settings when parley owns its process (``uvicorn app:app``), and only then: a host app
that embeds parley (``create_app``) keeps its own, as the collector is the whole process's.

Every stream keeps about 150 container objects alive (the ASGI stack's coroutines, a task group, cancel scopes,
the connection's objects), and every token has a few in flight (its pause, its send). CPython's collector
(thresholds 700, 10, 10) runs a young collection every 700 net new containers; each one promotes whatever is in
flight at that moment, so with thousands of streams the old generation keeps growing and gets a full collection
every few seconds, which walks every live stream: at 1,000 streams of 20 tokens/s, six full collections of
about 100-150 ms of CPU each in 20 s, and every stream stalls that long. A young threshold of 10,000 makes young
collections rare enough that the old generation hardly grows (no full collection in such a run; a young one
costs a few ms), and freezing what start-up made keeps it out of every collection from then on.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def tune_for_streams() -> None:
    """Freeze what start-up made (modules, routes, settings: they live as long as the process) and raise the
    young generation's threshold. Call it once, from the process's own start-up."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
