"""``make soak``: thousands of chats against real servers, with cancels, disconnects, deletes racing uploads
and chats, a Redis restart, a PostgreSQL restart and a ``kill -9`` of a worker; then every promise is checked.
About 5 minutes.

A third of the sessions talk to an agent that acts (tests/acting.py: reasoning, a tool call that takes a while,
usage), so some replies are cancelled or left mid-tool: their records must answer every tool call.

Driven only through the HTTP API (plus a look at the store and the files directory at the end), so it keeps
working whatever the streaming internals become. Loopback only. Exits non-zero on any violation.

    python -m tests.soak [--seconds 260] [--concurrency 32] [--only sqlite|redis|postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from redis.asyncio import Redis

from parley.sessions.redis_keys import SessionKeys
from parley.sessions.store import TERMINAL_STATUSES
from tests.conftest import PostgresServer, RedisServer, Subprocess, postgres_bin

WORDS = [f"w{i}" for i in range(60)]
APP = "tests.acting:app"  # parley with the echo agent and one that acts


@dataclass
class Chat:
    session_id: str
    server: str
    started: float
    plan: str  # complete | cancel | leave | leave-at-once
    interaction_id: str = ""
    received: str = ""
    ended: str = ""  # read-to-end | left | broken
    ended_at: float | None = None  # when the client read its end, left or lost the stream
    cancelled: bool | None = None  # what the cancel answered, if one was sent and answered


@dataclass
class Phase:
    name: str
    servers: dict[str, Subprocess]
    data_dir: Path
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    database_url: str = ""
    sessions: list[str] = field(default_factory=list)
    deleted: dict[str, float] = field(default_factory=dict)  # session -> when its delete was sent
    chats: list[Chat] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[tuple[float, float, str, int, str]] = field(default_factory=list)  # sent, answered, ...
    transport_errors: Counter[str] = field(default_factory=Counter)
    redis_down: list[tuple[float, float]] = field(default_factory=list)
    postgres_down: list[tuple[float, float]] = field(default_factory=list)
    killed: list[tuple[str, float, float]] = field(default_factory=list)  # server, killed at, back at
    events: list[str] = field(default_factory=list)

    def note(self, endpoint: str, response: httpx.Response, server: str, sent: float) -> None:
        self.statuses[(endpoint, response.status_code)] += 1
        if response.status_code >= 500:
            detail = f"{server}: {response.text[:120]}" if response.is_closed else server
            self.server_errors.append((sent, time.monotonic(), endpoint, response.status_code, detail))


class Driver:
    def __init__(self, phase: Phase, seconds: float, concurrency: int, max_chats: int, seed: int) -> None:
        self.phase = phase
        self.deadline = time.monotonic() + seconds
        self.concurrency = concurrency
        self.max_chats = max_chats
        self.rng = random.Random(seed)
        limits = httpx.Limits(max_connections=4 * concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5), limits=limits)

    def url(self, name: str | None = None) -> tuple[str, str]:
        name = name or self.rng.choice(sorted(self.phase.servers))
        return name, self.phase.servers[name].url

    def live_sessions(self) -> list[str]:
        return [s for s in self.phase.sessions if s not in self.phase.deleted]

    async def request(self, endpoint: str, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
        sent = time.monotonic()
        try:
            response = await self.client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            self.phase.transport_errors[f"{endpoint} {exc.__class__.__name__}"] += 1
            return None
        server = next(name for name, s in self.phase.servers.items() if url.startswith(s.url))
        self.phase.note(endpoint, response, server, sent)
        return response

    async def new_session(self) -> None:
        _, base = self.url()
        agent = self.rng.choices(["echo", "acting"], [2, 1])[0]
        response = await self.request("create", "POST", f"{base}/api/v1/sessions", json={"agent": agent})
        if response is not None and response.status_code == 201:
            self.phase.sessions.append(response.json()["ui_session_id"])

    async def run(self) -> None:
        for _ in range(self.concurrency * 4):
            await self.new_session()
        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(self.actor)
        await self.client.aclose()

    async def actor(self) -> None:
        while time.monotonic() < self.deadline and len(self.phase.chats) < self.max_chats:
            sessions = self.live_sessions()
            if len(sessions) < self.concurrency * 2:
                await self.new_session()
                continue
            # A few hot sessions draw many actors at once, so deletes race uploads and chats there.
            session_id = self.rng.choice(sessions[-8:] if self.rng.random() < 0.3 else sessions)
            roll = self.rng.random()
            if roll < 0.62:
                await self.chat(session_id)
            elif roll < 0.77:
                await self.upload(session_id)
            elif roll < 0.80:
                await self.abandoned_upload(session_id)
            elif roll < 0.825:
                await self.delete_session(session_id)
            elif roll < 0.87:
                await self.delete_a_file(session_id)
            else:
                _, base = self.url()
                await self.request("messages", "GET", f"{base}/api/v1/sessions/{session_id}/messages")

    async def chat(self, session_id: str) -> None:
        name, base = self.url()
        plan = self.rng.choices(["complete", "cancel", "leave", "leave-at-once"], [5, 3, 3, 1])[0]
        chat = Chat(session_id, name, time.monotonic(), plan)
        message = " ".join(self.rng.choices(WORDS, k=self.rng.randint(3, 40)))
        data: dict[str, str] = {"ui_session_id": session_id, "message": message}
        if self.rng.random() < 0.2:
            files = await self.request("list files", "GET", f"{base}/api/v1/files/{session_id}")
            if files is not None and files.status_code == 200 and files.json()["files"]:
                data["file_ids"] = f'["{self.rng.choice(files.json()["files"])["id"]}"]'
        stop_after = self.rng.randint(1, 12)
        try:
            async with self.client.stream("POST", f"{base}/api/v1/chat", data=data) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.phase.note("chat", response, name, chat.started)
                    return
                self.phase.note("chat", response, name, chat.started)
                chat.interaction_id = response.headers["x-interaction-id"]
                self.phase.chats.append(chat)
                if plan == "leave-at-once":
                    chat.ended, chat.ended_at = "left", time.monotonic()
                    return
                chunks = 0
                async for text in response.aiter_text():
                    chat.received += text
                    chunks += 1
                    if chunks == stop_after and plan == "leave":
                        chat.ended, chat.ended_at = "left", time.monotonic()
                        return
                    if chunks == stop_after and plan == "cancel":
                        _, other = self.url()  # any worker: the cancel must reach the owner
                        form = {"ui_session_id": session_id, "interaction_id": chat.interaction_id}
                        answer = await self.request("cancel", "POST", f"{other}/api/v1/cancel", data=form)
                        if answer is not None and answer.status_code == 200:
                            chat.cancelled = bool(answer.json()["cancelled"])
                chat.ended, chat.ended_at = "read-to-end", time.monotonic()
        except httpx.TransportError as exc:
            self.phase.transport_errors[f"chat {exc.__class__.__name__}"] += 1
            chat.ended, chat.ended_at = "broken", time.monotonic()

    async def upload(self, session_id: str) -> None:
        _, base = self.url()
        content = os.urandom(self.rng.randint(1, 20_000))
        files = {"file": ("soak.txt", content, "text/plain")}
        await self.request("upload", "POST", f"{base}/api/v1/files", data={"ui_session_id": session_id}, files=files)

    async def abandoned_upload(self, session_id: str) -> None:
        """A client that hangs up halfway through its upload's body."""
        _, base = self.url()
        host, port = base.removeprefix("http://").split(":")
        boundary = "soakboundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="ui_session_id"\r\n\r\n{session_id}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.bin"\r\n\r\n'
        ).encode() + b"x" * self.rng.randint(0, 30_000)
        head = (
            f"POST /api/v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body) + 50_000}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        try:
            with anyio.fail_after(10):
                async with await anyio.connect_tcp(host, int(port)) as stream:
                    await stream.send(head + body)
                    await anyio.sleep(self.rng.uniform(0, 0.05))
            self.phase.statuses[("abandoned upload", 0)] += 1
        except (OSError, TimeoutError, anyio.BrokenResourceError):
            self.phase.transport_errors["abandoned upload"] += 1

    async def delete_session(self, session_id: str) -> None:
        _, base = self.url()
        self.phase.deleted.setdefault(session_id, time.monotonic())
        response = await self.request("delete session", "DELETE", f"{base}/api/v1/sessions/{session_id}")
        if response is None or response.status_code not in (200, 404):
            # Not deleted after all (a 5xx, or the worker died): it stays a session to check.
            self.phase.deleted.pop(session_id, None)
        await self.new_session()

    async def delete_a_file(self, session_id: str) -> None:
        _, base = self.url()
        files = await self.request("list files", "GET", f"{base}/api/v1/files/{session_id}")
        if files is not None and files.status_code == 200 and files.json()["files"]:
            file_id = self.rng.choice(files.json()["files"])["id"]
            await self.request("delete file", "DELETE", f"{base}/api/v1/files/{session_id}/{file_id}")


async def chaos(phase: Phase, seconds: float) -> None:
    """On Redis: restart Redis at a third of the run, kill -9 worker a at two thirds (and start it again). On
    PostgreSQL and Redis: restart Redis at a quarter, PostgreSQL at a half, kill -9 host a at three quarters."""
    if phase.redis is None:
        return
    if phase.postgres is not None:
        await chaos_on_postgres(phase, seconds)
        return
    await anyio.sleep(seconds / 3)
    down = time.monotonic()
    phase.redis.stop()
    phase.events.append(f"redis stopped at {down - START:.1f}s")
    await anyio.sleep(3)
    await anyio.to_thread.run_sync(phase.redis.start)
    phase.redis_down.append((down, time.monotonic()))
    phase.events.append(f"redis back at {time.monotonic() - START:.1f}s")
    await anyio.sleep(seconds / 3 - 3)
    worker = phase.servers["a"]
    assert worker.process is not None
    killed = time.monotonic()
    worker.process.kill()  # SIGKILL: no shutdown, no last words
    worker.process.wait(10)
    phase.events.append(f"worker a killed (-9) at {killed - START:.1f}s")
    await anyio.sleep(2)
    await anyio.to_thread.run_sync(worker.start)
    phase.killed.append(("a", killed, time.monotonic()))
    phase.events.append(f"worker a back at {time.monotonic() - START:.1f}s")


async def chaos_on_postgres(phase: Phase, seconds: float) -> None:
    assert phase.redis is not None and phase.postgres is not None
    await anyio.sleep(seconds / 4)
    down = time.monotonic()
    phase.redis.stop()
    phase.events.append(f"redis stopped at {down - START:.1f}s")
    await anyio.sleep(3)
    await anyio.to_thread.run_sync(phase.redis.start)
    phase.redis_down.append((down, time.monotonic()))
    phase.events.append(f"redis back at {time.monotonic() - START:.1f}s")
    await anyio.sleep(seconds / 4 - 3)
    down = time.monotonic()
    await anyio.to_thread.run_sync(phase.postgres.stop)  # (immediate: as a crash would)
    phase.events.append(f"postgres stopped at {down - START:.1f}s")
    await anyio.sleep(3)
    await anyio.to_thread.run_sync(phase.postgres.start)
    phase.postgres_down.append((down, time.monotonic()))
    phase.events.append(f"postgres back at {time.monotonic() - START:.1f}s")
    await anyio.sleep(seconds / 4 - 3)
    worker = phase.servers["a"]
    assert worker.process is not None
    killed = time.monotonic()
    worker.process.kill()
    worker.process.wait(10)
    phase.events.append(f"host a killed (-9) at {killed - START:.1f}s")
    await anyio.sleep(2)
    await anyio.to_thread.run_sync(worker.start)
    phase.killed.append(("a", killed, time.monotonic()))
    phase.events.append(f"host a back at {time.monotonic() - START:.1f}s")


async def check(phase: Phase, lease: float) -> tuple[Counter[str], list[str]]:
    counts: Counter[str] = Counter()
    violations: list[str] = []
    await anyio.sleep(max(2 * lease, 3))  # disconnects noticed, leases of the killed worker run out, sweeps done
    base = next(iter(phase.servers.values())).url
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        histories: dict[str, dict[str, dict[str, Any]]] = {}
        for session_id in phase.sessions:
            response = await client.get(f"/api/v1/sessions/{session_id}")
            if session_id in phase.deleted:
                counts["sessions deleted"] += 1
                if response.status_code != 404:
                    violations.append(f"deleted session {session_id} answers {response.status_code}")
                continue
            counts["sessions kept"] += 1
            if response.status_code != 200 or response.json()["status"] != "idle":
                violations.append(f"session {session_id} is not idle: {response.status_code} {response.text[:100]}")
                continue
            messages = (await client.get(f"/api/v1/sessions/{session_id}/messages")).json()["messages"]
            histories[session_id] = {m["interaction_id"]: m for m in messages if m["role"] == "assistant"}
            for m in messages:
                if m["status"] not in TERMINAL_STATUSES:
                    violations.append(f"message {m['id']} is still {m['status']}")
    for chat in phase.chats:
        counts["chats streamed"] += 1
        if chat.session_id in phase.deleted:
            counts["chats whose session was deleted"] += 1
            continue
        found = len(violations)
        check_chat(phase, chat, histories.get(chat.session_id, {}).get(chat.interaction_id), counts, violations)
        # Where and when it ran, beside the outages: what the next person needs to tell a cause from another.
        violations[found:] = [f"{violation}\n         {_whereabouts(phase, chat)}" for violation in violations[found:]]
    await check_files(phase, counts, violations)
    for sent, at, endpoint, status, detail in phase.server_errors:
        # In flight while Redis was down (a request may queue for a connection until the pool's timeout).
        outages = [*phase.redis_down, *phase.postgres_down]
        during_outage = status == 503 and any(sent <= end + 2 and at >= start for start, end in outages)
        counts["5xx while Redis or PostgreSQL was down (503)" if during_outage else "5xx otherwise"] += 1
        if not during_outage:
            violations.append(
                f"{endpoint} answered {status} at {at - START:.1f}s, sent at {sent - START:.1f}s ({detail})"
            )
    return counts, violations


def check_chat(
    phase: Phase, chat: Chat, record: dict[str, Any] | None, counts: Counter[str], violations: list[str]
) -> None:
    """One reply: its record is what its reader got (a prefix of it, if its host was killed; what the reader left
    with is a prefix of it, if the reader left), and a cancel that said it stopped the reply did."""
    if record is None:
        violations.append(f"no record of {chat.interaction_id} ({chat.plan}, {chat.ended})")
        return
    counts[f"replies recorded {record['status']}"] += 1
    content, received = record["content"], chat.received
    check_parts(chat, record, counts, violations)
    # Its host was killed while the reply ran, or soon after its client saw the end (a reply is recorded within a
    # second of it, the stores being up): a reply long over by then was recorded by its live owner.
    killed = (
        any(
            name == chat.server and chat.started <= at and (chat.ended_at is None or chat.ended_at >= at - _RECORDED)
            for name, at, _ in phase.killed
        )
        and record["status"] == "interrupted"
    )
    if killed:
        # Its process died mid-reply: what reached the store last is a prefix of what the reader got.
        counts["replies interrupted by the kill -9"] += 1
        if not received.startswith(content):
            violations.append(f"{chat.interaction_id}: killed reply recorded {content!r}, reader got {received!r}")
    elif chat.ended == "read-to-end":
        if content != received:
            violations.append(f"{chat.interaction_id}: recorded {content!r} ({record['status']}), read {received!r}")
    elif not content.startswith(received):
        violations.append(f"{chat.interaction_id}: recorded {content!r}, the reader left with {received!r}")
    if chat.cancelled is not None:
        counts[f"cancels answered cancelled={chat.cancelled}"] += 1
        if chat.cancelled != (record["status"] == "cancelled"):
            said = f"the cancel said cancelled={chat.cancelled}"
            violations.append(f"{chat.interaction_id}: {said}, the record is {record['status']}")


# How long after its client saw the end a reply is sure to be recorded, when no outage is under way (generous: the
# machine may be loaded).
_RECORDED = 10.0


def _whereabouts(phase: Phase, chat: Chat) -> str:
    """A chat's host, plan and times (seconds since the soak began), and the outages of its phase."""
    ended = f"{chat.ended_at - START:.1f}s" if chat.ended_at is not None else "?"
    windows = [f"redis down {a - START:.1f}-{b - START:.1f}s" for a, b in phase.redis_down]
    windows += [f"postgres down {a - START:.1f}-{b - START:.1f}s" for a, b in phase.postgres_down]
    windows += [f"{name} killed {a - START:.1f}s (back {b - START:.1f}s)" for name, a, b in phase.killed]
    words = len(chat.received.split())
    return (
        f"(session {chat.session_id} on {chat.server}, plan {chat.plan}, {chat.ended or 'unfinished'} after {words} "
        f"words; {chat.started - START:.1f}s -> {ended}; {', '.join(windows) or 'no outage'})"
    )


def check_parts(chat: Chat, record: dict[str, Any], counts: Counter[str], violations: list[str]) -> None:
    """A reply's parts: its text is its content; every tool call is answered once the reply has ended (a killed
    process's may be left running: nobody was there to answer it)."""
    parts = record["parts"]
    text = "".join(part["text"] for part in parts if part["type"] == "text")
    if text != record["content"]:
        violations.append(f"{chat.interaction_id}: parts say {text!r}, content {record['content']!r}")
    for part in parts:
        if part["type"] != "dynamic-tool":
            continue
        counts[f"tool calls recorded {part['state']} ({record['status']})"] += 1
        if part["state"] == "output-error" and part["errorText"].startswith("Cancelled"):
            counts["tool calls cancelled mid-tool"] += 1
        if part["state"] not in ("output-available", "output-error") and record["status"] != "interrupted":
            violations.append(f"{chat.interaction_id}: a tool call left {part['state']} ({record['status']})")


async def check_files(phase: Phase, counts: Counter[str], violations: list[str]) -> None:
    if phase.postgres is not None:
        await check_files_in_postgres(phase, counts, violations)
        return
    files_dir = phase.data_dir / "files"
    blobs = {p.name for p in files_dir.iterdir() if p.is_file()} if files_dir.exists() else set()
    partials = sorted(p.name for p in (files_dir / ".partial").glob("*")) if files_dir.exists() else []
    if phase.redis is None:
        with sqlite3.connect(phase.data_dir / "parley.db") as db:
            records = {row[0] for row in db.execute("SELECT id FROM files")}
    else:
        redis = Redis.from_url(phase.redis.url, decode_responses=True)
        try:
            # A session's file records are a hash under its hash tag (sessions/redis_keys.py).
            records = set()
            async for key in redis.scan_iter("parley:{*}:files"):
                session_id = key.removeprefix("parley:{").removesuffix("}:files")
                ids = await redis.hkeys(key)  # type: ignore[misc]
                records |= set(ids)
                if ids and not await redis.exists(SessionKeys("parley:", session_id).session):
                    violations.append(f"file records {key} outlived their session {session_id}")
        finally:
            await redis.aclose()
    counts["files kept (record and blob)"] = len(blobs & records)
    counts["blobs without a record"] = len(blobs - records)
    counts["records without a blob"] = len(records - blobs)
    counts["partial files left"] = len(partials)
    violations += [f"blob without a record: {b}" for b in sorted(blobs - records)]
    violations += [f"record without a blob: {r}" for r in sorted(records - blobs)]
    violations += [f"partial upload left behind: {p}" for p in partials]


async def check_files_in_postgres(phase: Phase, counts: Counter[str], violations: list[str]) -> None:
    """Files' bytes are in PostgreSQL, beside their records (which go with their session: a foreign key); no host's
    data directory holds any."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(phase.database_url) as db:
        records = {row[0] for row in await (await db.execute("SELECT id FROM files")).fetchall()}
        blobs = {row[0] for row in await (await db.execute("SELECT id FROM blobs WHERE size IS NOT NULL")).fetchall()}
        partials = {row[0] for row in await (await db.execute("SELECT id FROM blobs WHERE size IS NULL")).fetchall()}
    on_disk = [p for p in phase.data_dir.parent.glob("data-*/files/*") if p.is_file()]
    counts["files kept (record and blob)"] = len(blobs & records)
    counts["blobs without a record"] = len(blobs - records)
    counts["records without a blob"] = len(records - blobs)
    counts["partial files left"] = len(partials)
    violations += [f"blob without a record: {b}" for b in sorted(blobs - records)]
    violations += [f"record without a blob: {r}" for r in sorted(records - blobs)]
    violations += [f"partial upload left behind: {p}" for p in sorted(partials)]
    violations += [f"a file's bytes on a host's disk: {p}" for p in on_disk]


START = time.monotonic()


def _tracebacks(log: str) -> list[str]:
    lines = log.splitlines()
    return [_last_line(lines, i) for i, line in enumerate(lines) if line.startswith("Traceback")]


def _last_line(lines: list[str], start: int) -> str:
    for line in lines[start + 1 :]:
        if line and not line.startswith((" ", "Traceback", "\n")) and not line.startswith("During handling"):
            return line
    return "?"


async def run_phase(name: str, root: Path, seconds: float, concurrency: int, max_chats: int) -> bool:
    lease = 2.0
    env = {
        "PARLEY_ECHO_DELAY": "0.01",
        "PARLEY_ACTING_DELAY": "0.01",
        "PARLEY_ACTING_TOOL_SECONDS": "0.2",
        "PARLEY_MAX_UPLOAD_BYTES": "65536",
        "PARLEY_BODY_TIMEOUT_SECONDS": "3",
        "PARLEY_REDIS_LEASE_SECONDS": str(lease),
        "PARLEY_DATA_DIR": str(root / name / "data"),
    }
    (root / name).mkdir(parents=True, exist_ok=True)
    redis = None
    postgres, database_url = None, ""
    if name == "postgres":
        # Two hosts: one PostgreSQL and one Redis, and a data directory each (they share no disk).
        bindir = postgres_bin()
        assert bindir is not None
        postgres = PostgresServer(bindir).init().start()
        database_url = postgres.create_database()
        redis = RedisServer(root / name / "redis").start()
        env = {**env, "PARLEY_REDIS_URL": redis.url, "PARLEY_DATABASE_URL": database_url}
        servers = {
            host: Subprocess(
                {**env, "PARLEY_DATA_DIR": str(root / name / f"data-{host}")}, log=root / name / f"{host}.log", app=APP
            )
            for host in ("a", "b")
        }
        for server in servers.values():
            server.start()
    elif name == "redis":
        redis = RedisServer(root / name / "redis").start()
        env["PARLEY_REDIS_URL"] = redis.url
        servers = {
            "a": Subprocess(env, log=root / name / "a.log", app=APP).start(),
            "b": Subprocess(env, log=root / name / "b.log", app=APP).start(),
        }
    else:
        servers = {"a": Subprocess(env, log=root / name / "a.log", app=APP).start()}
    phase = Phase(name, servers, root / name / "data", redis, postgres, database_url)
    began = time.monotonic()
    try:
        driver = Driver(phase, seconds, concurrency, max_chats, seed=20261129)
        async with anyio.create_task_group() as tg:  # (the chaos ends within the driving time)
            tg.start_soon(chaos, phase, seconds)
            tg.start_soon(driver.run)
        # (On PostgreSQL, long enough too for the sweeper to remove the partial uploads of the killed host.)
        counts, violations = await check(
            phase, lease if postgres is None else 2 * float(env["PARLEY_BODY_TIMEOUT_SECONDS"])
        )
    finally:
        for server in servers.values():
            server.stop()
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.remove()
    print(f"\n== {name}: {len(servers)} worker(s), {time.monotonic() - began:.0f} s")
    for event in phase.events:
        print(f"   {event}")
    responses = Counter[str]()
    for (endpoint, status), n in phase.statuses.items():
        responses[f"{endpoint} {status}"] += n
    print("   responses: " + ", ".join(f"{k}: {v}" for k, v in sorted(responses.items())))
    if phase.transport_errors:
        print("   transport errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(phase.transport_errors.items())))
    for key, value in sorted(counts.items()):
        print(f"   {key}: {value}")
    print(f"   violations: {len(violations)}")
    for violation in violations[:30]:
        print(f"     - {violation}")
    for server in servers:  # what the servers said about their failures, if anything
        errors = _tracebacks((root / name / f"{server}.log").read_text())
        if errors:
            print(f"   worker {server} logged {len(errors)} traceback(s); the first ends: {errors[0]}")
    return not violations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=260, help="driving time, shared by the two phases")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-chats", type=int, default=6000, help="per phase")
    parser.add_argument("--only", choices=["sqlite", "redis", "postgres"])
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and data")
    args = parser.parse_args()
    if shutil.which("redis-server") is None and args.only != "sqlite":
        print("make soak needs redis-server (apt-get install redis-server)", file=sys.stderr)
        return 2
    if postgres_bin() is None and args.only in (None, "postgres"):
        print("make soak needs PostgreSQL (apt-get install postgresql)", file=sys.stderr)
        return 2
    phases = [args.only] if args.only else ["sqlite", "redis", "postgres"]
    shares = {"sqlite": 0.25, "redis": 0.35, "postgres": 0.4} if len(phases) == 3 else {phases[0]: 1.0}
    ok = True
    root = Path(tempfile.mkdtemp(prefix="parley-soak-"))
    try:
        for name in phases:
            seconds = args.seconds * shares[name]
            ok = asyncio.run(run_phase(name, root, seconds, args.concurrency, args.max_chats)) and ok
    finally:
        if args.keep:
            print(f"\nthe servers' logs and data are in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\nsoak: " + ("every promise held" if ok else "VIOLATIONS (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
