"""The servers a benchmark runs: each app under one of two uvicorn stacks, pinned to the server core; redis-server
and PostgreSQL.

Every server is a separate ``uvicorn`` process on a free loopback port, started and stopped by a context manager,
so a benchmark owns exactly the processes it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.client import raw_request

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1
APPS = {"floor": "bench.floor:app", "parley": "app:app", "peer": "bench.peer:app", "stub": "bench.model_stub:app",
        "acting": "bench.acting:app"}  # fmt: skip
SESSION_CONNECTIONS = 16  # sessions are made this many at a time: thousands of them for figure 2, in seconds
# uvicorn's two stacks: its pure-Python HTTP parser on the standard event loop, and the C ones (what its
# `standard` extra installs). The names are what the table prints.
STACKS = {
    "h11+asyncio": ["--http", "h11", "--loop", "asyncio"],
    "httptools+uvloop": ["--http", "httptools", "--loop", "uvloop"],
}
COMMON = ["--no-access-log", "--log-level", "warning", "--backlog", "8192"]
API_KEY = "bench-key-0123456789abcdef"
METRICS_TOKEN = "bench-operators-0123456789"  # the operators' token for /metrics, no owner's key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


@dataclass
class Server:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def status(self, method: str, path: str, headers: dict[str, str] | None = None) -> int:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return client.request(method, path, headers=headers if headers is not None else self.headers).status_code

    def sessions(self, count: int, agent: str | None = None) -> list[str]:
        """``count`` new sessions (the floor keeps none: any id will do)."""
        if self.kind == "floor":
            return [f"ses_{i}" for i in range(count)]
        return asyncio.run(self._sessions(count, agent))

    async def _sessions(self, count: int, agent: str | None) -> list[str]:
        # Raw keep-alive connections rather than an HTTP library's client: figure 2 makes up to 16,000 sessions per
        # try, and httpx spent about a millisecond of the client's core on each (the server's share is the same).
        body = json.dumps({"agent": agent} if agent else {}).encode()
        head = raw_request("POST", "/api/v1/sessions", self.port, {**self.headers, "Content-Type": "application/json",
                           "Content-Length": str(len(body))}, keep_alive=True)  # fmt: skip
        made: list[str] = []

        async def make(how_many: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                for _ in range(how_many):
                    writer.write(head + body)
                    status_line, _, fields = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
                    length = next(int(line.split(b":")[1]) for line in fields.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))  # fmt: skip
                    answer = await reader.readexactly(length)
                    if status_line.split()[1] != b"201":
                        raise RuntimeError(f"{self.kind}: POST /api/v1/sessions answered {status_line.decode()}")
                    made.append(str(json.loads(answer)["ui_session_id"]))
            finally:
                writer.close()

        share, rest = divmod(count, SESSION_CONNECTIONS)
        await asyncio.gather(*(make(share + (i < rest)) for i in range(SESSION_CONNECTIONS)))
        return made


@contextlib.contextmanager
def serve(
    kind: str,
    stack: str,
    env: dict[str, str] | None = None,
    data_dir: str | None = None,
    core: int = SERVER_CORE,
    headers: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``kind``'s app under ``stack``, with PARLEY_* ``env`` on top of the bench's defaults, until the block ends."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as scratch:
        full_env = {
            **os.environ,
            "PARLEY_ECHO_DELAY": "0",
            "PARLEY_DATA_DIR": data_dir or scratch,
            "PARLEY_MAX_MESSAGE_BYTES": str(1024 * 1024),
            **(env or {}),
        }
        command = ["taskset", "-c", str(core), sys.executable, "-m", "uvicorn", APPS[kind], *STACKS[stack], *COMMON]
        process = subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env=full_env)
        try:
            _wait_for_port(port, process, f"{kind} ({stack})")
            yield Server(kind, port, process, headers or {})
        finally:
            process.terminate()
            process.wait(10)


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextlib.contextmanager
def redis_server() -> Iterator[Redis | None]:
    """A redis-server of the bench's own on a free loopback port, in memory only (no snapshots, no append-only
    file: like the SQLite store's ``synchronous=NORMAL``, a commit is not an fsync). None when there is none."""
    if shutil.which("redis-server") is None:
        yield None
        return
    port = free_port()
    # On the server core: the server side (parley and its store) gets one core, as with SQLite, whose writes run
    # on a thread of parley's. On the client core, each of a chat's round trips to Redis waited for wrk's slice.
    command = ["taskset", "-c", str(SERVER_CORE), "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no", "--databases", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process, "redis-server")
        yield Redis(port, process)
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Postgres:
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"bench_{os.urandom(6).hex()}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")  # (a name made here)
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres | None]:
    """A PostgreSQL cluster of the bench's own (initdb in a temporary directory, as the postgres user when run as
    root), on a free loopback port and the server core, with fsync off: as the bench's Redis keeps nothing on disk
    and its SQLite does not fsync each commit. None when PostgreSQL or psycopg is not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    try:
        import psycopg  # noqa: F401
    except ImportError:
        found = []
    if not found:
        yield None
        return
    bindir = found[-1].parent
    directory = Path(tempfile.mkdtemp(prefix="parley-bench-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres")
    port = free_port()
    data, log = str(directory / "data"), str(directory / "log")
    run = {"check": True, "capture_output": True, "cwd": directory}
    try:
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                        "--no-locale", "-E", "UTF8", "--no-sync"], **run)  # type: ignore[call-overload]  # fmt: skip
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(["taskset", "-c", str(SERVER_CORE), *as_postgres, str(bindir / "pg_ctl"), "-D", data, "-l",
                        log, "-w", "-o", options, "start"], **run)  # type: ignore[call-overload]  # fmt: skip
        yield Postgres(port, directory)
    finally:
        if (directory / "data" / "postmaster.pid").exists():
            subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                           **run)  # type: ignore[call-overload]  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)


def has_redis_extra() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True
