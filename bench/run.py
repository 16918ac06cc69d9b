"""``make bench``: parley against the floor (a bare ASGI app) and a peer (FastAPI with history), as ratios within
one run, every figure under both of uvicorn's stacks (h11+asyncio and httptools+uvloop), side by side.

Every server, and the bench's redis-server, is pinned to core 0; the load generators (this process for streams,
wrk for short chats) to core 1. ``python -m bench.run --only 1,1b,4`` runs a subset (figure numbers or names).
A figure whose feature the server does not have yet (a 404 from an older branch, say) reads "n/a".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

from bench import chats, latency, report, streams
from bench.latency import Missing
from bench.report import Row
from bench.servers import (
    API_KEY,
    CLIENT_CORE,
    METRICS_TOKEN,
    STACKS,
    Postgres,
    Redis,
    Server,
    has_redis_extra,
    postgres_server,
    redis_server,
    serve,
)

FIGURES = ["throughput", "concurrency", "short", "cancel", "rejoin", "first-token", "access", "stores", "postgres"]
ALIASES = {"1": "throughput", "1b": "throughput", "2": "concurrency", "3": "short", "4": "cancel", "5": "rejoin",
           "6": "first-token", "7": "access"}  # fmt: skip
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Replies for benchmarks 4 and 5 run at 50 tokens/s, a fast model's pace: they are cancelled or rejoined after the
# first token, so the pace sets how long each sample waits for it.
SLOW = {"PARLEY_ECHO_DELAY": "0.02"}


@dataclass
class Bench:
    args: argparse.Namespace
    redis: Redis | None
    cluster: Postgres | None = None  # PostgreSQL, for the postgres figure
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
    def workers(self, stack: str, env: dict[str, str] | None = None) -> Iterator[tuple[Server, Server]]:
        """Two parley processes on one Redis, sharing a data directory: two workers behind a load balancer."""
        shared = {**self.redis_env(), **(env or {})}
        with tempfile.TemporaryDirectory(prefix="parley-bench-") as data, serve("parley", stack, shared, data) as a:
            with serve("parley", stack, shared, data) as b:
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

    # 2

    def concurrency(self, stack: str) -> None:
        a = self.args
        log = self.details.setdefault("2", [])
        levels = (a.start, a.step, a.finest, a.top)
        held = streams.concurrency(stack, ("floor", "parley"), levels, a.tokens, 2, log)
        (floor, floor_missed), (parley, parley_missed) = held["floor"], held["parley"]
        if floor is None or parley is None:
            floor_n, parley_n = (f"{x.streams}" if x else f"< {a.start}" for x in (floor, parley))
            result = f"floor {floor_n}, parley {parley_n}"
            self.rows.append(Row("2. concurrent streams", stack, result, "≥ 0.8 × floor's N", False))
            return
        at_least = "" if floor_missed else "≥ "  # held the highest level tried: its limit is above
        # A miss with the client's core busy may be the client's limit, not the server's: say so.
        misses = (("floor", floor_missed), ("parley", parley_missed))
        busy = [f"{kind} missed {m.streams} with the client at {m.client_cpu:.0%} CPU"
                for kind, m in misses if m and m.client_cpu >= 0.9]  # fmt: skip
        ratio, memory = parley.streams / floor.streams, parley.rss_per_stream_kib / floor.rss_per_stream_kib
        result = (f"floor {at_least}{floor.streams} ({floor.rss_per_stream_kib:.0f} KiB/stream), "
                  f"parley {parley.streams} ({parley.rss_per_stream_kib:.0f} KiB/stream): {ratio:.2f} × floor's N, "
                  f"{memory:.2f} × its memory") + "".join(f" ({b})" for b in busy)  # fmt: skip
        target = "≥ 0.8 × floor's N; memory ≤ 1.3 × floor's"
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

    def stores(self, stack: str) -> None:
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
                    self.note("stores", f"{store}: {messages} in {len(sessions)} sessions made in "
                                        f"{time.perf_counter() - started:.0f} s")  # fmt: skip
                group[f"{store}, {messages}"] = (full, sessions)
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        for name, r in rate.items():
            self.note("stores", f"{stack}: {name}: {r} (rounds: {', '.join(f'{x:,.0f}' for x in r.rounds)})")
        if "Redis" in rate:
            sqlite, redis = rate["SQLite"], rate["Redis"]
            result = f"SQLite {sqlite}, Redis {redis}: {redis.per_second / sqlite.per_second:.2f}"
            self.rows.append(Row("Redis store against SQLite", stack, result, "", None))
        costs = []
        for store in places:
            empty, long = rate[store], rate[f"{store}, {messages}"]
            micros = 1e6 / long.per_second - 1e6 / empty.per_second
            costs.append(f"{store} {long} ({micros:+.0f} µs per chat)")
        self.rows.append(Row(messages, stack, "; ".join(costs), "", None))

    def postgres(self, stack: str) -> None:
        """PostgreSQL + Redis (data in PostgreSQL, claims, cancels and rejoins in Redis), placed as the bench places
        Redis: short chats/s against SQLite, and cancel and rejoin across two workers (hosts with no shared disk)."""
        if self.cluster is None:
            raise Missing("no PostgreSQL (or no psycopg) on this machine")
        scaled = {**self.redis_env(), "PARLEY_DATABASE_URL": self.cluster.create_database()}
        with serve("parley", stack) as sqlite, serve("parley", stack, scaled) as scaled_out:
            group = {
                "SQLite": (sqlite, sqlite.sessions(4 * chats.CONNECTIONS)),
                "PostgreSQL + Redis": (scaled_out, scaled_out.sessions(4 * chats.CONNECTIONS)),
            }
            rate = chats.rates(group, self.args.rounds, self.args.seconds)
        for name, r in rate.items():
            self.note("postgres", f"{stack}: {name}: {r} (rounds: {', '.join(f'{x:,.0f}' for x in r.rounds)})")
        ratio = rate["PostgreSQL + Redis"].per_second / rate["SQLite"].per_second
        result = f"SQLite {rate['SQLite']}, PostgreSQL + Redis {rate['PostgreSQL + Redis']}: {ratio:.2f}"
        self.rows.append(Row("PostgreSQL + Redis against SQLite, short chats", stack, result, "≥ 0.5", ratio >= 0.5))
        env = {**SLOW, **self.redis_env(), "PARLEY_DATABASE_URL": self.cluster.create_database()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(FIGURES), help="figures: " + ", ".join(FIGURES) + " or 1..7, 1b")
    parser.add_argument("--stacks", default=",".join(STACKS), help=", ".join(STACKS))
    parser.add_argument("--runs", type=int, default=5, help="benchmark 1: streams per server, the median counts")
    parser.add_argument("--start", type=int, default=1000, help="benchmark 2: the first level")
    parser.add_argument("--step", type=int, default=1000, help="benchmark 2: climb by this until a level is missed")
    parser.add_argument("--finest", type=int, default=250, help="benchmark 2: then bisect down to this")
    parser.add_argument("--top", type=int, default=12000, help="benchmark 2: the highest level tried")
    parser.add_argument("--tokens", type=int, default=200, help="benchmark 2: tokens per stream (at 20 a second)")
    parser.add_argument("--rounds", type=int, default=3, help="wrk figures: rounds per server, the median counts")
    parser.add_argument("--seconds", type=int, default=4, help="wrk figures: seconds per round")
    parser.add_argument("--history-chats", type=int, default=chats.HISTORY_CHATS, help="stores: chats per session")
    parser.add_argument("--count", type=int, default=200, help="benchmarks 4 to 6: samples per figure")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="every code path in about 3 minutes; figures are noise")
    args = parser.parse_args()
    if args.smoke:
        smoke = {"runs": 1, "start": 50, "step": 50, "top": 100, "finest": 25, "tokens": 20, "rounds": 1, "seconds": 1}
        vars(args).update(smoke, count=5, history_chats=5)
    chosen = {ALIASES.get(name.strip(), name.strip()) for name in args.only.split(",")}
    unknown = chosen - set(FIGURES) | set(args.stacks.split(",")) - set(STACKS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    os.sched_setaffinity(0, {CLIENT_CORE})
    started = time.perf_counter()
    with redis_server() as redis, postgres_server() as postgres:
        bench = Bench(args, redis, postgres)
        for figure in (f for f in FIGURES if f in chosen):
            for stack in args.stacks.split(","):
                print(f"{figure} ({stack})", flush=True)
                try:
                    getattr(bench, figure.replace("-", "_"))(stack)
                except Missing as missing:
                    bench.rows.append(Row(figure, stack, f"n/a ({missing})", "", None))
                except Exception as error:  # one broken figure must not cost the others a 20-minute run
                    traceback.print_exc()
                    bench.rows.append(Row(figure, stack, f"error: {type(error).__name__}: {error}", "", False))
        stack_row = bench.stack_row()
        if stack_row:
            bench.rows.append(stack_row)
    minutes = (time.perf_counter() - started) / 60
    table = report.table(bench.rows)
    print("\n" + table + f"\n\n{minutes:.1f} minutes")
    if args.write:
        everything = args.only == parser.get_default("only")
        command = "make bench" if everything else "python -m bench.run " + " ".join(sys.argv[1:])
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        report.write(stamp, command, minutes, table, bench.details)


if __name__ == "__main__":
    main()
