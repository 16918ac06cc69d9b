"""Prometheus metrics, served at ``GET /metrics`` (``PARLEY_METRICS=0`` turns them off).

Each app keeps its metrics in a registry of its own (:class:`Metrics`): importing parley registers nothing, and two
apps in one process do not collide. A host that wants them in its own registry passes one to ``create_app``.

Under ``uvicorn --workers N`` every worker is a process of its own, and a scrape reaches one of them: the
metrics must add up across all of them. prometheus_client does that in its multiprocess mode, where each
process writes its values to files in one directory (``PROMETHEUS_MULTIPROC_DIR``) and a scrape reads them
all. ``uvicorn app:app`` sets it up by itself (:func:`share_across_workers`, called only where parley owns the
process): uvicorn starts its workers with :mod:`multiprocessing`, so a worker finds its siblings' directory
through their common parent's process id. Set ``PROMETHEUS_MULTIPROC_DIR`` yourself for other process managers
(gunicorn forks its workers: it is not a multiprocessing parent).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

if TYPE_CHECKING:
    from parley.sessions.turns import TurnReport

_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"

# A chat request lasts as long as its stream: the buckets reach minutes.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def share_across_workers() -> str | None:
    """Put this process's metrics in the directory its sibling workers share, when it has siblings (a uvicorn
    worker), and return it. Changes the process (an environment variable, prometheus_client's value class): only
    for a process that is parley's, before any app is made."""
    if os.environ.get(_MULTIPROC):
        path = os.environ[_MULTIPROC]
    else:
        parent = multiprocessing.parent_process()
        if parent is None or parent.pid is None:
            return None  # one process: plain in-memory values
        root = Path(tempfile.gettempdir())
        _remove_stale(root, parent.pid)
        directory = root / f"parley-metrics-{parent.pid}"
        directory.mkdir(mode=0o700, exist_ok=True)
        path = os.environ[_MULTIPROC] = str(directory)
    # prometheus_client picks its value class when it is first imported, from the environment; that import came
    # before the variable was set, so pick again: the metrics made after this write to the shared files.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


def _remove_stale(root: Path, parent_pid: int) -> None:
    """Remove the directories of uvicorns that have exited, and ours if an earlier process with our parent's pid
    left it (its counts are not ours). A sibling worker's files are newer than our parent, so they stay."""
    for path in root.glob("parley-metrics-*"):
        pid = path.name.rpartition("-")[2]
        if not pid.isdigit():
            continue
        try:
            if int(pid) == parent_pid:
                stale = path.stat().st_mtime < _started_at(parent_pid)
            else:
                stale = not _alive(int(pid))
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _started_at(pid: int) -> float:
    """When the process started (seconds since the epoch), from /proc; 0 where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return 0.0
    ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, counted after the command's name
    return int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")


class Metrics:
    """Every metric of one app, in one registry (a new one unless the host gives its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.http_requests = Counter(
            "parley_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "parley_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (a chat's: to the end of its stream).",
            ["method", "route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.streams_in_progress = Gauge(
            "parley_streams_in_progress", "Interactions running now.", multiprocess_mode="livesum", registry=registry
        )
        self.interactions = Counter(
            "parley_interactions",
            "Interactions ended, by agent and the status recorded in history.",
            ["agent", "status"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "parley_time_to_first_token_seconds",
            "Time from an interaction's start to its first token.",
            ["agent"],
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.interaction_duration = Histogram(
            "parley_interaction_duration_seconds",
            "Time from an interaction's start to its end.",
            ["agent"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens_streamed = Counter(
            "parley_tokens_streamed", "Tokens streamed to clients.", ["agent"], registry=registry
        )
        self.cancel_requests = Counter(
            "parley_cancel_requests",
            "POST /api/v1/cancel, by result: cancelled_here, cancelled_elsewhere, not_running, failed.",
            ["result"],
            registry=registry,
        )
        self.rejoins = Counter(
            "parley_rejoins", "Streams rejoined (GET /api/v1/chat/{ui_session_id}/stream).", registry=registry
        )
        self.store_errors = Counter(
            "parley_store_errors",
            "Store operations that failed (Redis or PostgreSQL unreachable, an SQLite error).",
            ["store"],
            registry=registry,
        )
        self.store_duration = Histogram(
            "parley_store_duration_seconds",
            "Time a store operation took, a retry included (PostgreSQL).",
            ["store"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "parley_upstream_errors", "Failures of an agent's model server.", ["agent"], registry=registry
        )

    def store_failed(self, store: str) -> None:
        """A store's hook (its ``on_error``): one of its operations failed."""
        self.store_errors.labels(store).inc()

    def store_took(self, store: str, seconds: float) -> None:
        """A store's hook (its ``on_duration``): how long one of its operations took."""
        self.store_duration.labels(store).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, with their content type: every worker's, in multiprocess mode."""
        if not os.environ.get(_MULTIPROC):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def process_exiting(self) -> None:
        """Drop this process's share of the live gauges (streams in progress) when it shuts down."""
        if os.environ.get(_MULTIPROC):
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class RequestMetrics:
    """Counts one HTTP request, labelled by its route template (never its path: no session ids in labels).

    The labelled children are kept, since looking one up through ``labels()`` costs a lock and some
    allocation on every request, and a service has only a few dozen (method, route, status) triples."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        count = self._counts.get((method, route, status))
        if count is None:
            count = self._counts[method, route, status] = self._metrics.http_requests.labels(method, route, str(status))
        count.inc()
        duration = self._durations.get((method, route))
        if duration is None:
            duration = self._durations[method, route] = self._metrics.http_duration.labels(method, route)
        duration.observe(seconds)


class InteractionMetrics:
    """A turn observer (:class:`sessions.turns.TurnObserver`): streams in progress, interactions by how they
    ended, time to first token, duration, tokens, and the model servers' failures. (The labelled children
    are kept per agent, as in :class:`RequestMetrics`: a lookup through ``labels()`` costs more than the count.)"""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._agents: dict[str, tuple[Any, Any, Any]] = {}
        self._ended: dict[tuple[str, str], Any] = {}

    def _of(self, agent: str) -> tuple[Any, Any, Any]:
        children = self._agents.get(agent)
        if children is None:
            children = self._agents[agent] = (
                self._metrics.time_to_first_token.labels(agent),
                self._metrics.interaction_duration.labels(agent),
                self._metrics.tokens_streamed.labels(agent),
            )
        return children

    def turn_started(self, turn: TurnReport) -> None:
        self._metrics.streams_in_progress.inc()

    def first_token(self, turn: TurnReport) -> None:
        if turn.first_token_at is not None:
            self._of(turn.agent)[0].observe(turn.first_token_at - turn.started)

    def turn_ended(self, turn: TurnReport) -> None:
        self._metrics.streams_in_progress.dec()
        ended = self._ended.get((turn.agent, turn.status))
        if ended is None:
            ended = self._ended[turn.agent, turn.status] = self._metrics.interactions.labels(turn.agent, turn.status)
        ended.inc()
        _, duration, tokens = self._of(turn.agent)
        if turn.ended_at is not None:
            duration.observe(turn.ended_at - turn.started)
        if turn.tokens:
            tokens.inc(turn.tokens)
        if turn.upstream:
            self._metrics.upstream_errors.labels(turn.agent).inc()
