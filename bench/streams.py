"""Benchmarks 1, 1b and 2: one stream's tokens per second (plain text and SSE), and concurrent streams held."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

from bench.client import form_post, open_stream, percentile, run
from bench.servers import Server, serve

WORDS = 50_000
GAP_LIMIT_MS = 100.0
SSE = {"Accept": "text/event-stream"}


async def _one_stream(server: Server, session_id: str, message: str, headers: dict[str, str]) -> tuple[float, str]:
    raw = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": message}, server.port, headers=headers)
    stream, _, done = await open_stream(server.port, raw)
    await done
    assert stream.status == 200 and stream.ended_at is not None, f"{server.kind}: status {stream.status}"
    return stream.ended_at - stream.sent_at, stream.first_body.decode(errors="replace")


def throughput(stack: str, runs: int = 5) -> dict[str, float | None]:
    """Tokens per second of the floor, parley (plain text and SSE) and the peer: the median of ``runs`` streams
    of 50,000 words each. The servers take turns, stream by stream, so that a noisy moment on the machine falls
    on all of them rather than on one. SSE is None when parley answers it in plain text (no SSE yet)."""
    message = " ".join(f"w{i % 1000}" for i in range(WORDS))
    ways = {"floor": ("floor", {}), "parley": ("parley", {}), "parley SSE": ("parley", SSE), "peer": ("peer", {})}
    times: dict[str, list[float]] = {way: [] for way in ways}
    with contextlib.ExitStack() as stack_of_servers:
        servers = {kind: stack_of_servers.enter_context(serve(kind, stack)) for kind in ("floor", "parley", "peer")}
        sessions = {way: servers[kind].sessions(runs + 1) for way, (kind, _) in ways.items()}
        for way, (kind, headers) in list(ways.items()):
            _, first = run(_one_stream(servers[kind], sessions[way][-1], "warm up " * 100, headers))
            if headers is SSE and not first.lstrip("0123456789abcdef\r\n").startswith(("data:", "id:", ":")):
                del ways[way]  # parley answered SSE's Accept in plain text: the feature is not there
        for i in range(runs):
            for way, (kind, headers) in ways.items():
                times[way].append(run(_one_stream(servers[kind], sessions[way][i], message, headers))[0])
    return {way: (WORDS / sorted(t)[len(t) // 2] if t else None) for way, t in times.items()}


@dataclass
class Level:
    streams: int
    p99_gap_ms: float
    completed: int
    rss_per_stream_kib: float
    client_cpu: float

    @property
    def held(self) -> bool:
        return self.completed == self.streams and self.p99_gap_ms <= GAP_LIMIT_MS


async def _many_streams(server: Server, sessions: list[str], tokens: int) -> Level:
    message = " ".join(f"t{i}" for i in range(tokens))
    idle_rss = server.rss_kib()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    opened = [
        await open_stream(server.port, form_post("/api/v1/chat", {"ui_session_id": s, "message": message}, server.port))
        for s in sessions
    ]
    await asyncio.sleep(tokens * 0.05 / 2)
    rss = server.rss_kib() - idle_rss
    await asyncio.wait_for(asyncio.gather(*(done for _, _, done in opened)), timeout=tokens * 0.05 * 6 + 30)
    client_cpu = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    gaps: list[float] = []
    completed = 0
    for stream, _, _ in opened:
        gaps.extend(b - a for a, b in itertools.pairwise(stream.arrivals[1:]))
        completed += stream.status == 200 and stream.size > len(message)
    return Level(len(sessions), percentile(gaps, 99) * 1000, completed, rss / len(sessions), client_cpu)


def _next_level(held: int, missed: int | None, step: int, finest: int, top: int) -> int | None:
    """Climb by ``step`` until a miss, then halve the bracket down to ``finest``: a handful of tries per server."""
    if missed is None:
        return held + step if held + step <= top else None
    middle = (held + missed) // 2 // finest * finest
    return middle if held < middle < missed else None


def concurrency(
    stack: str,
    kinds: tuple[str, ...],
    levels: tuple[int, int, int, int],
    tokens: int,
    attempts: int,
    log: list[str],
) -> dict[str, tuple[Level | None, Level | None]]:
    """The largest number of 20 tokens/s streams each server holds with a p99 gap ≤ 100 ms. Each server climbs
    from ``start`` by ``step`` (up to ``top``) until it misses, then bisects the bracket down to ``finest``; in
    each round every server still searching takes its turn, so a noisy moment falls on all of them. A level
    missed gets up to ``attempts`` tries and keeps the best: noise on a shared machine only ever adds delay.
    For each server: the level it held, and the lowest it missed (None: its limit is above the top tried)."""
    start, step, finest, top = levels
    best: dict[str, Level | None] = {kind: None for kind in kinds}
    missed: dict[str, Level | None] = {kind: None for kind in kinds}
    trying: dict[str, int | None] = {kind: start for kind in kinds}
    while any(n is not None for n in trying.values()):
        for kind, n in list(trying.items()):
            if n is None:
                continue
            level = None
            for _ in range(attempts):
                with serve(kind, stack, {"PARLEY_ECHO_DELAY": "0.05"}) as server:
                    tried = run(_many_streams(server, server.sessions(n), tokens))
                line = (f"{stack:16} {kind:6} N={n:5}: p99 gap {tried.p99_gap_ms:7.1f} ms, "
                        f"{tried.completed}/{n} complete, {tried.rss_per_stream_kib:6.1f} KiB/stream, "
                        f"client CPU {tried.client_cpu:.0%}")  # fmt: skip
                log.append(line)
                print("  " + line, flush=True)
                if level is None or tried.p99_gap_ms < level.p99_gap_ms:
                    level = tried
                if level.held:
                    break
            assert level is not None
            if level.held:
                best[kind] = level
            else:
                missed[kind] = level
            held, miss = best[kind], missed[kind]
            bound = miss.streams if miss else None
            trying[kind] = _next_level(held.streams, bound, step, finest, top) if held else None
    return {kind: (best[kind], missed[kind]) for kind in kinds}
