"""``make bench``: parley against the floor (a bare ASGI app) and a peer (FastAPI), in one run, as ratios.

Every server runs under the same uvicorn settings, pinned to core 0; the load generators (this process
for streams, wrk for short chats) are pinned to core 1, so client and server never share a core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx

from bench.client import form_post, open_stream, percentile, request

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1
APPS = {"floor": "bench.floor:app", "parley": "app:app", "peer": "bench.peer:app"}
UVICORN = ["--http", "h11", "--loop", "asyncio", "--no-access-log", "--log-level", "warning", "--backlog", "8192"]
WORDS = 50_000
GAP_LIMIT_MS = 100.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    kind: str
    port: int
    process: subprocess.Popen[bytes]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def sessions(self, count: int) -> list[str]:
        if self.kind != "parley":
            return [f"ses_{i}" for i in range(count)]
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}") as client:
            return [client.post("/api/v1/sessions").json()["ui_session_id"] for _ in range(count)]


@contextlib.contextmanager
def serve(kind: str, echo_delay: float) -> Iterator[Server]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as data_dir:
        env = {
            **os.environ,
            "PARLEY_ECHO_DELAY": str(echo_delay),
            "PARLEY_DATA_DIR": data_dir,
            "PARLEY_MAX_MESSAGE_BYTES": str(1024 * 1024),
        }
        command = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "uvicorn", APPS[kind]]
        process = subprocess.Popen([*command, *UVICORN, "--port", str(port)], cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{kind} did not start")
                time.sleep(0.05)
            yield Server(kind, port, process)
        finally:
            process.terminate()
            process.wait(10)


# 1. One stream's throughput


async def _one_stream(server: Server, session_id: str, message: str) -> float:
    raw = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": message}, server.port)
    stream, _, done = await open_stream(server.port, raw)
    await done
    assert stream.status == 200 and stream.ended_at is not None, f"{server.kind}: status {stream.status}"
    return stream.ended_at - stream.sent_at


def throughput(runs: int = 7) -> dict[str, float]:
    """Tokens per second of each server, the median of ``runs`` streams. The servers take turns, stream by
    stream, so that a noisy moment on the machine falls on all of them rather than on one."""
    message = " ".join(f"w{i % 1000}" for i in range(WORDS))
    times: dict[str, list[float]] = {kind: [] for kind in APPS}
    with contextlib.ExitStack() as stack:
        servers = {kind: stack.enter_context(serve(kind, 0.0)) for kind in APPS}
        sessions = {kind: server.sessions(runs + 1) for kind, server in servers.items()}
        for kind, server in servers.items():
            asyncio.run(_one_stream(server, sessions[kind][-1], "warm up " * 100))
        for i in range(runs):
            for kind, server in servers.items():
                times[kind].append(asyncio.run(_one_stream(server, sessions[kind][i], message)))
    return {kind: WORDS / sorted(t)[len(t) // 2] for kind, t in times.items()}


# 2. Concurrent streams


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
        arrivals = stream.arrivals
        gaps.extend(b - a for a, b in itertools.pairwise(arrivals[1:]))
        completed += stream.status == 200 and stream.size > len(message)
    return Level(len(sessions), percentile(gaps, 99) * 1000, completed, rss / len(sessions), client_cpu)


LEVEL_LINES: list[str] = []


def concurrency(levels: list[int], tokens: int = 200, attempts: int = 2) -> dict[str, Level | None]:
    """The largest level each server held. Levels rise together: at each N every server still in the race
    runs in turn, so a noisy moment on the machine is shared rather than landing on one server's levels.
    Each server gets ``attempts`` tries at each level, in rounds, and keeps its best: noise on a shared
    machine only ever adds delay, so the best try is the closer estimate of what the server can do."""
    held: dict[str, Level | None] = {kind: None for kind in APPS}
    racing = list(APPS)
    for n in levels:
        best: dict[str, Level] = {}
        for _ in range(attempts):
            for kind in racing:
                if kind in best and best[kind].held:
                    continue
                with serve(kind, 0.05) as server:
                    sessions = server.sessions(n)
                    level = asyncio.run(_many_streams(server, sessions, tokens))
                line = (f"{kind:6} N={n:5}: p99 gap {level.p99_gap_ms:7.1f} ms, {level.completed}/{n} complete, "
                        f"{level.rss_per_stream_kib:6.1f} KiB/stream, client CPU {level.client_cpu:.0%}")  # fmt: skip
                LEVEL_LINES.append(line)
                print("  " + line, flush=True)
                if kind not in best or (level.held, -level.p99_gap_ms) > (best[kind].held, -best[kind].p99_gap_ms):
                    best[kind] = level
        for kind in list(racing):
            if best[kind].held:
                held[kind] = best[kind]
            else:
                racing.remove(kind)
        if not racing:
            break
    return held


# 3. Short chats per second (wrk)


WRK_SCRIPT = """
local sessions = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do sessions[#sessions + 1] = line end
end
request = function()
  i = i % #sessions + 1
  local body = "ui_session_id=" .. sessions[i] .. "&message=hi"
  return wrk.format("POST", "/api/v1/chat", {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end
"""


def short_chats(kind: str, seconds: int = 10, connections: int = 64) -> tuple[float, int]:
    with serve(kind, 0.0) as server, tempfile.TemporaryDirectory() as tmp:
        # Many more sessions than connections, used in turn, so no session is ever asked twice at once. The
        # warm-up has sessions of its own: the chats it leaves cut off at its end may still be recording when
        # the measured run starts, and a session of theirs would answer 409.
        sessions = server.sessions(connections * 20)
        (Path(tmp) / "warm-up.txt").write_text("\n".join(sessions[: connections * 4]) + "\n")
        (Path(tmp) / "sessions.txt").write_text("\n".join(sessions[connections * 4 :]) + "\n")
        (Path(tmp) / "chat.lua").write_text(WRK_SCRIPT)
        url = f"http://127.0.0.1:{server.port}"
        wrk = ["taskset", "-c", str(CLIENT_CORE), "wrk", "-t1", f"-c{connections}", "-s", f"{tmp}/chat.lua"]
        subprocess.run([*wrk, "-d2s", url, "--", f"{tmp}/warm-up.txt"], capture_output=True, check=True)
        out = subprocess.run(
            [*wrk, f"-d{seconds}s", url, "--", f"{tmp}/sessions.txt"], capture_output=True, text=True, check=True
        ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, int(bad.group(1)) if bad else 0


# 4. Cancel latency


async def _cancels(server: Server, sessions: list[str]) -> list[float]:
    message = " ".join(f"c{i}" for i in range(400))
    latencies = []
    for session_id in sessions:
        chat = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": message}, server.port)
        stream, first, done = await open_stream(server.port, chat)
        await first.wait()
        cancel = form_post("/api/v1/cancel", {"ui_session_id": session_id}, server.port)
        started = time.perf_counter()
        answer = asyncio.ensure_future(request(server.port, cancel))
        await done
        assert stream.ended_at is not None
        latencies.append(stream.ended_at - started)
        assert b'"cancelled":true' in await answer
    return latencies


def cancel_latency(count: int = 200) -> tuple[float, float]:
    with serve("parley", 0.05) as server:
        sessions = server.sessions(count)
        latencies = asyncio.run(_cancels(server, sessions))
    return percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000


# the report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("starlette", "uvicorn", "anyio", "fastapi", "httpx")
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    system = f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"
    return f"{system}; {versions}; {wrk}"


def _held(level: Level | None, top: int) -> str:
    if level is None:
        return "< first level"
    at_least = "≥ " if level.streams == top else ""  # held the highest level tried: its limit is above
    return f"{at_least}{level.streams} ({level.rss_per_stream_kib:.0f} KiB/stream)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="throughput,concurrency,short,cancel")
    # Finer steps where the servers' limits have been (2,000 to 4,000 on a 2-core test machine).
    parser.add_argument("--levels", default="500,1000,1500,2000,2250,2500,2750,3000,3250,3500,3750,4000,5000,6000")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.sched_setaffinity(0, {CLIENT_CORE})
    rows: list[tuple[str, str, str, str, str]] = []

    if "throughput" in only:
        tps = throughput()
        cells = [f"{tps[k]:,.0f}" for k in APPS]
        rows.append(("1. one stream, tokens/s", *cells, f"{tps['parley'] / tps['floor']:.2f} (≥ 0.9)"))
    if "concurrency" in only:
        levels = [int(n) for n in args.levels.split(",")]
        held = concurrency(levels)
        cells = [_held(held[k], levels[-1]) for k in APPS]
        ratio = (held["parley"].streams / held["floor"].streams) if held["parley"] and held["floor"] else 0.0
        at_most = "≤ " if held["floor"] and held["floor"].streams == levels[-1] else ""
        rows.append(("2. streams held at p99 gap ≤ 100 ms", *cells, f"{at_most}{ratio:.2f} (≥ 0.8)"))
    if "short" in only:
        rps = {kind: short_chats(kind) for kind in APPS}
        cells = [f"{rps[k][0]:,.0f}" + (f" ({rps[k][1]} non-2xx)" if rps[k][1] else "") for k in APPS]
        ratio = rps["parley"][0] / rps["floor"][0]
        versus_peer = rps["parley"][0] / rps["peer"][0]
        rows.append(("3. short chats/s, 64 clients", *cells, f"{ratio:.2f} (≥ 0.6); {versus_peer:.2f}x peer (≥ 1.2)"))
    if "cancel" in only:
        p50, p99 = cancel_latency()
        rows.append(("4. cancel → stream end, ms", "", f"p50 {p50:.2f}, p99 {p99:.2f}", "", f"p99 {p99:.2f} ms (≤ 5)"))

    header = ("benchmark", "floor", "parley", "peer (FastAPI)", "parley vs target")
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ("---",) * 5, *rows])
    print("\n" + table)
    if args.write:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = "make bench" if args.only == parser.get_default("only") else " ".join(sys.argv)
        levels = "\n".join(LEVEL_LINES)
        details = f"\n## Benchmark 2, level by level\n\n```\n{levels}\n```\n" if LEVEL_LINES else ""
        (ROOT / "bench" / "RESULTS.md").write_text(
            f"# Benchmark results\n\n{stamp}, `{command}`\n\nMachine: {machine()}\n\n{table}\n{details}"
        )


if __name__ == "__main__":
    main()
