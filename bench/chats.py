"""Short chats per second, driven by wrk: benchmark 3, benchmark 7 (API keys and metrics), and the stores.

wrk posts one-word chats round a list of sessions from 64 connections. A group of servers is started together
and measured in rounds, one server at a time, each round in turn: a noisy moment on the machine then falls on
every server of the group, and each server's figure is the median of its rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.client import form_post, run
from bench.servers import API_KEY, CLIENT_CORE, METRICS_TOKEN, Server

CONNECTIONS = 64
HISTORY_CHATS = 500  # a user message and a reply each: 1,000 messages
HISTORY_SESSIONS = 96  # more than CONNECTIONS: no session is asked twice at once

_REQUEST = """
local sessions = {}
local i = 0
local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
init = function(args)
  for line in io.lines(args[1]) do sessions[#sessions + 1] = line end
  if args[2] ~= "" then headers["Authorization"] = "Bearer " .. args[2] end
end
request = function()
  i = i % #sessions + 1
  return wrk.format("POST", "/api/v1/chat", headers, "ui_session_id=" .. sessions[i] .. "&message=hi")
end
"""


@dataclass
class Rate:
    per_second: float
    non_2xx: int
    rounds: list[float]

    def __str__(self) -> str:
        bad = f" ({self.non_2xx} non-2xx)" if self.non_2xx else ""
        return f"{self.per_second:,.0f}/s{bad}"


def _wrk(server: Server, sessions: Path, script: Path, seconds: int) -> tuple[float, int]:
    key = API_KEY if "Authorization" in server.headers else ""
    command = ["taskset", "-c", str(CLIENT_CORE), "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(script)]
    out = subprocess.run(
        [*command, server.url, "--", str(sessions), key], capture_output=True, text=True, check=True
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate is not None, out
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return float(rate.group(1)), int(bad.group(1)) if bad else 0


def _settle() -> None:
    # wrk stops with chats in flight; give the server a moment to record them before the sessions are used again
    # (a session still busy with its last chat would answer 409).
    time.sleep(0.5)


def rates(servers: dict[str, tuple[Server, list[str]]], rounds: int = 3, seconds: int = 5) -> dict[str, Rate]:
    """Short chats per second of each named server, over its own sessions (at least CONNECTIONS + 1 of them:
    then no session is asked twice at once)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "chat.lua"
        script.write_text(_REQUEST)
        files: dict[str, Path] = {}
        for name, (server, sessions) in servers.items():
            files[name] = Path(tmp) / f"{len(files)}.txt"
            files[name].write_text("\n".join(sessions) + "\n")
            _wrk(server, files[name], script, 2)  # warm-up
            _settle()
        measured: dict[str, list[tuple[float, int]]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, (server, _) in servers.items():
                measured[name].append(_wrk(server, files[name], script, seconds))
                _settle()
    return {
        name: Rate(statistics.median(r for r, _ in runs), sum(b for _, b in runs), [r for r, _ in runs])
        for name, runs in measured.items()
    }


async def _chat_in_turn(server: Server, sessions: list[str], chats: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(chats):
            for session_id in sessions:
                fields = {"ui_session_id": session_id, "message": "hi"}
                writer.write(form_post("/api/v1/chat", fields, server.port, keep_alive=True, headers=server.headers))
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{server.kind}: a chat answered {head[:12]!r}")
                await reader.readuntil(b"\r\n0\r\n\r\n")  # the end of the chunked body
    finally:
        writer.close()


async def _fill(server: Server, sessions: list[str], chats: int) -> None:
    # One connection per pair of sessions, each chatting in its own sessions only: never two chats in one at once.
    await asyncio.gather(*(_chat_in_turn(server, sessions[i : i + 2], chats) for i in range(0, len(sessions), 2)))


def fill_history(server: Server, sessions: list[str], chats: int = HISTORY_CHATS) -> None:
    """``chats`` chats in each session, through the API (so whatever the store keeps is what a real chat leaves).
    wrk cannot do this: it runs for a duration, not a number of requests."""
    run(_fill(server, sessions, chats))


def access_features(server: Server) -> tuple[bool, bool]:
    """Whether a server started with PARLEY_API_KEYS refuses a request without its key, and serves /metrics."""
    keys = server.status("GET", "/api/v1/sessions", headers={}) == 401
    with contextlib.suppress(Exception):
        return keys, server.status("GET", "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}) == 200
    return keys, False
