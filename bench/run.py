"""``make bench``: parley against the floor (a bare ASGI app) and a peer (FastAPI with history), as ratios within
one run, every figure under both of uvicorn's stacks (h11+asyncio and httptools+uvloop), side by side.

Every server, and the bench's redis-server and PostgreSQL, is pinned to core 0; the load generators (this process
for streams, wrk for short chats) to core 1. ``python -m bench.run --only 1,1b,4`` runs a subset (figure numbers
or names); ``--estimate`` prints how long the chosen figures should take, and runs nothing; ``--quick`` runs every
figure's code path with tiny parameters (a couple of minutes, figures are noise). A figure whose feature the
server does not have yet (a 404 or 400 from an older branch, say) reads "n/a (feature missing)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench import chats, latency, report, streams
from bench.client import percentile
from bench.latency import Missing
from bench.report import Row
from bench.servers import (
    API_KEY,
    CLIENT_CORE,
    METRICS_TOKEN,
    ROOT,
    SERVER_CORE,
    STACKS,
    Postgres,
    Redis,
    Server,
    has_redis_extra,
    postgres_server,
    redis_server,
    serve,
)

# In the order they run. "history" (short chats with a 1,000-message history in every session) has no target and
# takes minutes: only when asked for (--only history).
FIGURES = ["throughput", "acting", "concurrency", "short", "access", "stores", "cancel", "rejoin", "postgres",
           "first-token", "tools", "busy", "history"]  # fmt: skip
DEFAULT = [figure for figure in FIGURES if figure != "history"]
ALIASES = {"1": ["throughput"], "1b": ["throughput"], "1c": ["acting"], "2": ["concurrency"], "3": ["short"],
           "4": ["cancel", "postgres"], "5": ["rejoin", "postgres"], "6": ["first-token"], "7": ["access"],
           "8": ["tools"], "9": ["stores"], "10": ["busy"]}  # fmt: skip
TITLES = {"throughput": "1. one stream", "acting": "1c. one stream, SSE, half reasoning, tool calls",
          "concurrency": "2. concurrent streams", "short": "3. short chats, 64 clients", "access": "7. short chats, "
          "API keys and metrics on", "stores": "9. short chats on Redis, PostgreSQL + Redis", "cancel": "4. cancel",
          "rejoin": "5. rejoin", "postgres": "4, 5. cancel, rejoin on PostgreSQL + Redis",
          "first-token": "6. first-token overhead", "tools": "8. tool-call overhead", "busy": "10. if_busy",
          "history": "short chats with a long history"}  # fmt: skip
# Figure 2 starts from a guess near each stack's limits on the last quiet runs (h11+asyncio: floor 3,000-3,750,
# parley 2,000-2,750; httptools+uvloop: floor 8,000 to ≥ 13,250, parley 7,000 to ≥ 11,250, by host), the same for
# both servers so that they run one level alike (memory is compared there): a handful of tries each.
FIRST_GUESS = {"h11+asyncio": 2500, "httptools+uvloop": 9000}
# Seconds each stack's figure 2 may take, all tries included (the last quiet run's httptools+uvloop search took 878 s,
# its limit at the latency line for five levels): the search reports what it found by then.
BUDGET = 300.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Replies for benchmarks 4 and 5 run at 50 tokens/s, a fast model's pace: they are cancelled or rejoined after the
# first token, so the pace sets how long each sample waits for it.
SLOW = {"PARLEY_ECHO_DELAY": "0.02"}


@dataclass
class Bench:
    args: argparse.Namespace
    redis: Redis | None
    cluster: Postgres | None = None  # PostgreSQL, for the stores and postgres figures
    rows: list[Row] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=dict)
    _next_db: int = 0
    _history: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # store → (its place, sessions)
    parley: dict[tuple[str, str], float] = field(default_factory=dict)  # (what, stack) → parley's figure

    def stack_row(self) -> Row | None:
        """Does the default stack (httptools+uvloop) beat the pure-Python one on parley's own figures?"""
        slow, fast = STACKS
        both = self.parley.keys()
        measured = [what for what in ("one stream", "short chats") if {(what, fast), (what, slow)} <= both]
        pairs = [(what, self.parley[what, fast] / self.parley[what, slow]) for what in measured]
        if not pairs:
            return None
        result = ", ".join(f"{what} {gain:.2f} ×" for what, gain in pairs)
        better = min(gain for _, gain in pairs) > 1
        return Row(f"parley on {fast} against {slow}", "both", result, "> 1 (the default)", better)

    def note(self, section: str, line: str) -> None:
        self.details.setdefault(section, []).append(line)
        print(f"  {line}", flush=True)

    def redis_env(self) -> dict[str, str]:
        if self.redis is None or not has_redis_extra():
            raise Missing("no redis-server (or no redis-py) on this machine")
        self._next_db += 1
        return {"PARLEY_REDIS_URL": self.redis.url(self._next_db)}

    @contextlib.contextmanager
    def workers(
        self, stack: str, env: dict[str, str] | None = None, kind: str = "parley"
    ) -> Iterator[tuple[Server, Server]]:
        """Two parley processes on one Redis, sharing a data directory: two workers behind a load balancer."""
        shared = {**self.redis_env(), **(env or {})}
        with tempfile.TemporaryDirectory(prefix="parley-bench-") as data, serve(kind, stack, shared, data) as a:
            with serve(kind, stack, shared, data) as b:
                yield a, b

    # 1 and 1b

    def throughput(self, stack: str) -> None:
        tps = streams.throughput(stack, self.args.runs)
        floor, parley, sse, peer = tps["floor"], tps["parley"], tps["parley SSE"], tps["peer"]
        assert floor and parley and peer
        self.note("1", f"{stack}: tokens/s floor {floor:,.0f}, parley {parley:,.0f}, "
                       f"parley SSE {f'{sse:,.0f}' if sse else 'n/a'}, peer {peer:,.0f}")  # fmt: skip
        self.parley["one stream", stack] = parley
        ratio = parley / floor
        result = f"parley {parley:,.0f} tokens/s, floor {floor:,.0f}, peer {peer:,.0f}: {ratio:.2f} × floor"
        self.rows.append(Row("1. one stream, plain text", stack, result, "≥ 0.9 × floor", ratio >= 0.9))
        if sse is None:
            self.rows.append(Row("1b. one stream, SSE", stack, "n/a (feature missing)", "≥ 0.75 × floor", None))
        else:
            ratio = sse / floor
            result = f"parley SSE {sse:,.0f} tokens/s: {ratio:.2f} × floor"
            self.rows.append(Row("1b. one stream, SSE", stack, result, "≥ 0.75 × floor", ratio >= 0.75))

    def acting(self, stack: str) -> None:
        """1c: a reply that reasons and calls tools, through SSE, against the floor streaming the same words."""
        tps = streams.acting_throughput(stack, self.args.runs)
        figure, target = "1c. one stream, SSE, half reasoning, tool calls", "≥ 0.75 × floor"
        floor, parley = tps["floor"], tps["parley"]
        if floor is None or parley is None:
            self.rows.append(Row(figure, stack, "n/a (feature missing: no reasoning or tool frames)", target, None))
            return
        self.note(
            "1c", f"{stack}: tokens/s floor {floor:,.0f}, parley (reasoning, text, tool calls, SSE) {parley:,.0f}"
        )
        ratio = parley / floor
        result = f"parley {parley:,.0f} tokens/s, floor {floor:,.0f}: {ratio:.2f} × floor"
        self.rows.append(Row(figure, stack, result, target, ratio >= 0.75))

    # 2

    def concurrency(self, stack: str) -> None:
        a = self.args
        log = self.details.setdefault("2", [])
        start = a.start or FIRST_GUESS[stack]
        levels = streams.Levels(start, a.growth, a.finest, a.top, tokens=a.tokens, budget=a.budget or None)
        searches = streams.concurrency(stack, ("floor", "parley"), levels, log)
        floor_search, parley_search = searches["floor"], searches["parley"]
        floor, parley = floor_search.held, parley_search.held
        target = "≥ 0.8 × floor's N; memory ≤ 1.3 × floor's"
        stopped = f" (search stopped at its {levels.budget:.0f} s budget)" if floor_search.stopped else ""
        floor_n, parley_n = _limit(floor_search), _limit(parley_search)
        if floor is None or parley is None:
            self.rows.append(
                Row("2. concurrent streams", stack, f"floor {floor_n}, parley {parley_n}{stopped}", target, False)
            )
            return
        # A miss with the client's core busy may be the client's limit, not the server's: say so.
        misses = (("floor", floor_search.missed), ("parley", parley_search.missed))
        busy = [f"{kind} missed {m.streams} with the client at {m.client_cpu:.0%} CPU"
                for kind, m in misses if m and m.client_cpu >= 0.9]  # fmt: skip
        # Memory per stream is compared at the same N, where both ran the same streams: at very different N the
        # memory the idle process had freed, reused by the streams, skews it. The highest N both held; else (one
        # missed every level the other held) the highest both ran to the end, every stream complete.
        both = set(floor_search.all_held()) & set(parley_search.all_held()) or {
            n for n in set(floor_search.ran) & set(parley_search.ran)
            if all(s.ran[n].completed == n for s in (floor_search, parley_search))
        }  # fmt: skip
        at = max(both) if both else None
        floor_kib, parley_kib = (floor, parley) if at is None else (floor_search.ran[at], parley_search.ran[at])
        ratio, memory = parley.streams / floor.streams, parley_kib.rss_per_stream_kib / floor_kib.rss_per_stream_kib
        self.note("2", f"{stack}: tries: floor {floor_search.tries}, parley {parley_search.tries}{stopped}")
        where = f" at N={at}" if at is not None else ""
        result = (f"floor {floor_n}, parley {parley_n}: {ratio:.2f} × floor's N; "
                  f"{parley_kib.rss_per_stream_kib:.0f} KiB/stream against {floor_kib.rss_per_stream_kib:.0f}{where}: "
                  f"{memory:.2f} × its memory") + stopped + "".join(f" ({b})" for b in busy)  # fmt: skip
        self.rows.append(Row("2. concurrent streams", stack, result, target, ratio >= 0.8 and memory <= 1.3))

    # 3, 7 and the stores

    def short(self, stack: str) -> None:
        with serve("floor", stack) as floor, serve("parley", stack) as parley, serve("peer", stack) as peer:
            group = {s.kind: (s, s.sessions(4 * chats.CONNECTIONS)) for s in (floor, parley, peer)}
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        for kind, r in rate.items():
            self.note("3", f"{stack}: {kind:6} {r} (rounds: {', '.join(f'{x:,.0f}' for x in r.rounds)})")
        self.parley["short chats", stack] = rate["parley"].per_second
        versus_peer = rate["parley"].per_second / rate["peer"].per_second
        of_floor = rate["parley"].per_second / rate["floor"].per_second
        result = (f"parley {rate['parley']}, peer {rate['peer']}: {versus_peer:.2f} × peer; "
                  f"floor {rate['floor']}: {of_floor:.2f} × floor")  # fmt: skip
        self.rows.append(Row("3. short chats, 64 clients", stack, result, "≥ 2 × peer", versus_peer >= 2))

    def access(self, stack: str) -> None:
        """7: API keys and metrics on (the operators' PARLEY_METRICS_TOKEN set: /metrics is theirs) against both
        off."""
        on_env = {"PARLEY_API_KEYS": f"bench:{API_KEY}", "PARLEY_METRICS": "1", "PARLEY_METRICS_TOKEN": METRICS_TOKEN}
        with serve("parley", stack, {"PARLEY_METRICS": "0"}) as off, serve("parley", stack, on_env, headers=AUTH) as on:
            keys, metrics = chats.access_features(on)
            figure, target = "7. short chats, API keys and metrics on", "≥ 0.9 × both off"
            if not keys and not metrics:
                self.rows.append(Row(figure, stack, "n/a (feature missing)", target, None))
                return
            group = {"off": (off, off.sessions(4 * chats.CONNECTIONS)), "on": (on, on.sessions(4 * chats.CONNECTIONS))}
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        ratio = rate["on"].per_second / rate["off"].per_second
        partial = "" if keys and metrics else f" (only {'API keys' if keys else 'metrics'}: the other is missing)"
        self.note("7", f"{stack}: on {rate['on']} {rate['on'].rounds}, off {rate['off']} {rate['off'].rounds}")
        result = f"on {rate['on']}, off {rate['off']}: {ratio:.2f}{partial}"
        self.rows.append(Row(figure, stack, result, target, ratio >= 0.9))

    def scaled_env(self) -> dict[str, str]:
        """PostgreSQL + Redis: the data in a fresh PostgreSQL database, claims, cancels and rejoins in Redis."""
        if self.cluster is None:
            raise Missing("no PostgreSQL (or no psycopg) on this machine")
        return {**self.redis_env(), "PARLEY_DATABASE_URL": self.cluster.create_database()}

    def stores(self, stack: str) -> None:
        """9: short chats/s on Redis (store and coordinator) and on PostgreSQL + Redis, against SQLite: one group,
        in turn. A store the machine lacks (no redis-server, no PostgreSQL) reads n/a."""
        places: dict[str, dict[str, str] | None] = {"SQLite": {}}
        for name, make in (("Redis", self.redis_env), ("PostgreSQL + Redis", self.scaled_env)):
            try:
                places[name] = make()
            except Missing as missing:
                places[name] = None
                self.note("9", f"{stack}: {name}: n/a ({missing})")
        with contextlib.ExitStack() as stack_of_servers:
            group: dict[str, tuple[Server, list[str]]] = {}
            for name, env in places.items():
                if env is not None:
                    server = stack_of_servers.enter_context(serve("parley", stack, env))
                    group[name] = (server, server.sessions(4 * chats.CONNECTIONS))
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        for name, r in rate.items():
            self.note("9", f"{stack}: {name}: {r} (rounds: {', '.join(f'{x:,.0f}' for x in r.rounds)})")
        sqlite = rate["SQLite"]
        against = (("Redis", "Redis (store and coordinator)", 0.6), ("PostgreSQL + Redis", "PostgreSQL + Redis", 0.5))
        for name, title, limit in against:
            figure = f"9. short chats, {title} against SQLite"
            if name not in rate:
                self.rows.append(Row(figure, stack, "n/a (no server on this machine)", f"≥ {limit}", None))
                continue
            ratio = rate[name].per_second / sqlite.per_second
            result = f"{name} {rate[name]}, SQLite {sqlite}: {ratio:.2f}"
            self.rows.append(Row(figure, stack, result, f"≥ {limit}", ratio >= limit))

    def history(self, stack: str) -> None:
        """Short chats/s on SQLite and on Redis, fresh and with a long history in every session. The histories are
        made once, through the API, and kept for the other stack's servers (a data directory, a Redis database)."""
        messages = f"{2 * self.args.history_chats:,}-message history"
        places = {"SQLite": {}, "Redis": self.redis_env()} if self.redis and has_redis_extra() else {"SQLite": {}}
        if not self._history:
            self._history["SQLite"] = (tempfile.mkdtemp(prefix="parley-bench-history-"), [])
            if "Redis" in places:
                self._history["Redis"] = (self.redis_env()["PARLEY_REDIS_URL"], [])
        with contextlib.ExitStack() as stack_of_servers:
            group: dict[str, tuple[Server, list[str]]] = {}
            for store, env in places.items():
                fresh = stack_of_servers.enter_context(serve("parley", stack, env))
                group[store] = (fresh, fresh.sessions(4 * chats.CONNECTIONS))
                place, sessions = self._history[store]
                full_env = {"PARLEY_REDIS_URL": place} if store == "Redis" else {}
                full = stack_of_servers.enter_context(serve("parley", stack, full_env, place if not full_env else None))
                if not sessions:
                    started = time.perf_counter()
                    sessions = full.sessions(chats.HISTORY_SESSIONS)
                    chats.fill_history(full, sessions, self.args.history_chats)
                    self._history[store] = (place, sessions)
                    self.note("history", f"{store}: {messages} in {len(sessions)} sessions made in "
                                         f"{time.perf_counter() - started:.0f} s")  # fmt: skip
                group[f"{store}, {messages}"] = (full, sessions)
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        for name, r in rate.items():
            self.note("history", f"{stack}: {name}: {r} (rounds: {', '.join(f'{x:,.0f}' for x in r.rounds)})")
        costs = []
        for store in places:
            empty, long = rate[store], rate[f"{store}, {messages}"]
            micros = 1e6 / long.per_second - 1e6 / empty.per_second
            costs.append(f"{store} {long} ({micros:+.0f} µs per chat)")
        self.rows.append(Row(messages, stack, "; ".join(costs), "", None))

    def postgres(self, stack: str) -> None:
        """4 and 5 on PostgreSQL + Redis (data in PostgreSQL, claims, cancels and rejoins in Redis): cancel and
        rejoin across two workers that share no disk (two hosts)."""
        env = {**SLOW, **self.scaled_env()}
        with tempfile.TemporaryDirectory() as data_a, tempfile.TemporaryDirectory() as data_b:
            with serve("parley", stack, env, data_a) as a, serve("parley", stack, env, data_b) as b:
                p50, p99 = latency.cancel_latency(a, b, self.args.count)
                self.rows.append(Row("4. cancel → stream end, another worker (PostgreSQL + Redis)", stack,
                                     f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", "p99 ≤ 8 ms", p99 <= 8))  # fmt: skip
                figure = "5. rejoin → first replayed byte, another worker (PostgreSQL + Redis)"
                self._rejoin_row(figure, stack, a, b, 20)

    # 4, 5, 6

    def cancel(self, stack: str) -> None:
        count = self.args.count
        with serve("parley", stack, SLOW) as server:
            p50, p99 = latency.cancel_latency(server, server, count)
        self.rows.append(Row("4. cancel → stream end, one process", stack, f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                             "p99 ≤ 5 ms", p99 <= 5))  # fmt: skip
        with self.workers(stack, SLOW) as (a, b):
            p50, p99 = latency.cancel_latency(a, b, count)
        self.rows.append(Row("4. cancel → stream end, another worker", stack, f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                             "p99 ≤ 8 ms", p99 <= 8))  # fmt: skip

    def rejoin(self, stack: str) -> None:
        env = SLOW
        figure = "5. rejoin → first replayed byte"
        with serve("parley", stack, env) as server:
            self._rejoin_row(f"{figure}, one process", stack, server, server, 10)
        with self.workers(stack, env) as (a, b):
            self._rejoin_row(f"{figure}, owning worker (Redis)", stack, a, a, 10)
            self._rejoin_row(f"{figure}, another worker (Redis)", stack, a, b, 20)

    def _rejoin_row(self, figure: str, stack: str, owner: Server, rejoiner: Server, limit: float) -> None:
        try:
            p50, p99 = latency.rejoin_latency(owner, rejoiner, self.args.count)
        except Missing as missing:
            self.rows.append(Row(figure, stack, f"n/a (feature missing: {missing})", f"p99 ≤ {limit:g} ms", None))
            return
        self.rows.append(Row(figure, stack, f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", f"p99 ≤ {limit:g} ms", p99 <= limit))

    def first_token(self, stack: str) -> None:
        with serve("stub", stack, core=CLIENT_CORE) as stub:
            env = {"PARLEY_OPENAI_BASE_URL": f"{stub.url}/v1", "PARLEY_OPENAI_API_KEY": "sk-bench"}
            with serve("parley", stack, env) as parley:
                figures = latency.first_token_overhead(parley, stub, self.args.count)
        self.note("6", f"{stack}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in figures.items()))
        p50, p99 = figures["overhead p50"], figures["overhead p99"]
        result = (f"overhead p50 {p50:.2f} ms, p99 {p99:.2f} ms (through parley p99 {figures['through p99']:.2f}, "
                  f"stub direct p99 {figures['direct p99']:.2f})")  # fmt: skip
        self.rows.append(Row("6. first-token overhead, openai agent", stack, result, "p99 ≤ 2 ms", p99 <= 2))

    # 8, 10

    def tools(self, stack: str) -> None:
        """8: what parley adds around a tool call (bench/tool_overhead.py: the openai agent, the tests' stub model
        server, the example MCP server over stdio), in a process of its own on the server core, on the stack's
        event loop (the agent runs on uvloop under httptools+uvloop)."""
        loop = "uvloop" if "uvloop" in stack else "asyncio"
        command = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "bench.tool_overhead", "--json"]
        done = subprocess.run([*command, "--calls", str(self.args.count), "--loop", loop], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            if "ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr:
                raise Missing(f"feature missing: {tail[0]}")
            raise RuntimeError(f"bench.tool_overhead exited {done.returncode}: {tail[0]}")
        figures: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
        cells = []
        worst = 0.0
        for name, values in figures.items():
            p50, p99 = percentile(values, 50), percentile(values, 99)
            worst = max(worst, p99)
            cells.append(f"{name} p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        self.note("8", f"{stack}: " + "; ".join(cells) + f" ({len(next(iter(figures.values())))} calls)")
        figure = "8. tool-call overhead (model's call → MCP tool; tool → model's next request)"
        self.rows.append(Row(figure, stack, "; ".join(cells), "p99 ≤ 3 ms each", worst <= 3))

    def busy(self, stack: str) -> None:
        """10: a message into a busy session: ``if_busy=interrupt`` → the new reply's first byte, in one process
        and from the other of two workers on Redis; ``if_busy=enqueue`` → its start after the reply before it
        ends, in one process."""
        count = self.args.count
        interrupt, enqueue = (
            "10. interrupt → new reply's first byte",
            "10. enqueued message's start after the reply before",
        )

        def row(figure: str, limit: float, measure: Callable[[], tuple[float, float]]) -> None:
            target = f"p99 ≤ {limit:g} ms"
            try:
                p50, p99 = measure()
            except Missing as missing:
                self.rows.append(Row(figure, stack, f"n/a (feature missing: {missing})", target, None))
                return
            self.rows.append(Row(figure, stack, f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", target, p99 <= limit))

        # bench.acting's agent as an echo, whose replies run at the pace their message asks for: the one stopped
        # (or waited for) at 50 tokens/s, the new one at once (parley's echo would pause before its first token).
        echo = {"BENCH_ACTING": "text"}
        with serve("acting", stack, echo) as server:
            row(f"{interrupt}, one process", 10, lambda: latency.interrupt_latency(server, server, count))
            row(f"{enqueue}, one process", 5, lambda: latency.enqueue_latency(server, count))
        with self.workers(stack, echo, kind="acting") as (a, b):
            row(f"{interrupt}, another worker (Redis)", 20, lambda: latency.interrupt_latency(a, b, count))


def _limit(search: streams.Search) -> str:
    """A server's limit as figure 2's search left it: the level held, "≥" when it held the highest level it tried,
    and the lowest level it missed when the search stopped before it had closed in."""
    if search.held is None:  # it missed every level it tried (or tried none before the budget ran out)
        return f"< {search.missed.streams}" if search.missed else "not tried"
    if search.missed is None:
        return f"≥ {search.held.streams}"
    return f"{search.held.streams} (< {search.missed.streams})" if search.stopped else f"{search.held.streams}"


def estimate(figure: str, stack: str, a: argparse.Namespace) -> float:
    """Seconds ``figure`` should take under ``stack`` with these parameters on a quiet 2-core machine (from the
    last full run's details: a 50,000-word stream ~0.5-0.7 s, a server's start ~1 s, a latency sample ~40 ms)."""
    runs, tokens, rounds, seconds, count = (
        int(getattr(a, name)) for name in ("runs", "tokens", "rounds", "seconds", "count")
    )
    fast = "uvloop" in stack
    stream = 0.5 if fast else 0.75
    wrk_group = {"short": 3, "access": 2, "stores": 3}
    if figure == "throughput":
        return 6 + runs * 4 * stream
    if figure == "acting":
        return 5 + runs * 2 * stream * 1.3
    if figure == "concurrency":
        guess = a.start or FIRST_GUESS[stack]
        # Per try: a server's start, making the sessions (~0.2 ms each), opening the streams one by one and their
        # 10 s (200 tokens at 20 a second), ~2 ms a stream in all; four tries per server (see streams._next_level).
        one = 3 + tokens * 0.05 * 1.2 + guess * 0.002
        return min(2 * 4 * one, a.budget or math.inf)
    if figure in wrk_group:
        servers = wrk_group[figure]
        return 3 + servers * (3 + 2.5 + rounds * (seconds + 0.5))
    samples = {"cancel": 2, "rejoin": 3, "postgres": 2, "first-token": 0.3, "tools": 0.4, "busy": 3.5}
    if figure in samples:
        return 4 + samples[figure] * (count + 20) * 0.045
    if figure == "history":
        return 60 + 4 * (3 + 2.5 + rounds * (seconds + 0.5))
    return 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only", default=",".join(DEFAULT), help="figures: " + ", ".join(FIGURES) + " or 1..10, 1b, 1c"
    )
    parser.add_argument("--stacks", default=",".join(STACKS), help=", ".join(STACKS))
    parser.add_argument(
        "--runs", type=int, default=5, help="benchmarks 1 and 1c: streams per server, the median counts"
    )
    parser.add_argument("--start", type=int, default=None, help="benchmark 2: the first level (default: per stack, "
                        + ", ".join(f"{stack} {n}" for stack, n in FIRST_GUESS.items()) + ")")  # fmt: skip
    parser.add_argument("--growth", type=float, default=1.25, help="benchmark 2: climb (or fall) by this factor")
    parser.add_argument("--finest", type=int, default=250, help="benchmark 2: then bisect, not finer than this")
    parser.add_argument("--top", type=int, default=16000, help="benchmark 2: the highest level tried")
    parser.add_argument("--budget", type=float, default=BUDGET, help="benchmark 2: seconds per stack (0: no limit); "
                        "the search stops when the next try would end past it")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=200, help="benchmark 2: tokens per stream (at 20 a second)")
    parser.add_argument("--rounds", type=int, default=3, help="wrk figures: rounds per server, the median counts")
    parser.add_argument("--seconds", type=int, default=4, help="wrk figures: seconds per round")
    parser.add_argument("--history-chats", type=int, default=chats.HISTORY_CHATS, help="history: chats per session")
    parser.add_argument("--count", type=int, default=200, help="benchmarks 4 to 6, 8 and 10: samples per figure")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    quick = "every figure's code path with tiny parameters (a few minutes); the figures are noise"
    parser.add_argument("--quick", "--smoke", action="store_true", help=quick)
    parser.add_argument("--estimate", action="store_true", help="print how long the figures should take; run nothing")
    args = parser.parse_args()
    if args.quick:
        tiny = {"runs": 1, "start": 50, "growth": 2.0, "top": 100, "finest": 25, "tokens": 20, "rounds": 1}
        vars(args).update(tiny, seconds=1, count=5, history_chats=5)
    chosen = {figure for name in args.only.split(",") for figure in ALIASES.get(name.strip(), [name.strip()])}
    stacks = args.stacks.split(",")
    unknown = chosen - set(FIGURES) | set(stacks) - set(STACKS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    plan = [(figure, stack) for figure in FIGURES if figure in chosen for stack in stacks]
    expected = {job: estimate(*job, args) for job in plan}
    print(f"expected: about {sum(expected.values()) / 60:.0f} minutes on a quiet machine", flush=True)
    if args.estimate:
        for (figure, stack), seconds in expected.items():
            print(f"  {figure:12} {stack:16} {seconds:5.0f} s")
        return
    os.sched_setaffinity(0, {CLIENT_CORE})
    started = time.perf_counter()
    with redis_server() as redis, postgres_server() as postgres:
        bench = Bench(args, redis, postgres)
        for figure, stack in plan:
            print(f"{figure} ({stack}), expected {expected[figure, stack]:.0f} s", flush=True)
            began = time.perf_counter()
            try:
                getattr(bench, figure.replace("-", "_"))(stack)
            except Missing as missing:
                bench.rows.append(Row(TITLES[figure], stack, f"n/a ({missing})", "", None))
            except Exception as error:  # one broken figure must not cost the others a 20-minute run
                traceback.print_exc()
                bench.rows.append(Row(TITLES[figure], stack, f"error: {type(error).__name__}: {error}", "", False))
            took = time.perf_counter() - began
            bench.note("durations", f"{figure:12} {stack:16} {took:5.0f} s (expected {expected[figure, stack]:.0f})")
        stack_row = bench.stack_row()
        if stack_row:
            bench.rows.append(stack_row)
    minutes = (time.perf_counter() - started) / 60
    table = report.table(bench.rows, report.last_round())
    print("\n" + table + f"\n\n{minutes:.1f} minutes", flush=True)
    if args.write:
        everything = args.only == parser.get_default("only") and not args.quick
        command = "make bench" if everything else "python -m bench.run " + " ".join(sys.argv[1:])
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        report.write(stamp, command, minutes, table, bench.details)


if __name__ == "__main__":
    main()
