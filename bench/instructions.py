"""``make bench-instructions``: CPU instructions per short chat and per streamed token, counted, not timed.

``make bench`` measures throughput, which drifts by ±5% or more between identical runs on a shared
machine: too coarse to tell whether a change to the hot path helped. This counts the instructions
the app itself executes, under ``valgrind --tool=callgrind``, which gives the same count run after
run whatever else the machine does. The app is driven in process through scripted ASGI messages
(no uvicorn, no sockets), so the counts are the app's own cost: parley and the peer with their SQLite
history, and the floor, from ``make bench``.

Each figure is the difference between two runs that differ only in the amount of work, divided by
that difference, so start-up cancels out. ``--inner`` runs one measurement without
valgrind (what the outer process calls). ``--what`` picks the figures: ``chat``, ``token`` (plain text),
``sse`` (per token of parley's server-sent events; the others have none), and per event of a reply that acts,
through SSE (:mod:`bench.acting`'s agent): ``reasoning`` (per reasoning token) and ``tool`` (per tool call: its
start, an input delta, the call and its result, two of which are written to the store at once). ``--stores``
picks the stores parley's ``chat`` is counted on: ``sqlite``, ``redis`` (Redis as store and coordinator) and
``postgres`` (PostgreSQL + Redis), each server started here on a free loopback port (as ``make bench`` does;
only parley's process is counted, not the servers').

``--env NAME=VALUE`` (repeatable) sets a variable for the app, to count what a setting costs, e.g.
``--only parley --env PARLEY_METRICS=0 --env PARLEY_API_KEYS=bench:bench-key``; with API keys, every
request carries the first one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import servers

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 64
WARM_UP = 5  # chats per client before the counted ones
SESSIONS = CONCURRENCY * 4
FEATURE_MISSING = 3  # the inner process's exit status when the app lacks what is counted (reasoning, tool frames)


def _key_header() -> list[tuple[bytes, bytes]]:
    """``Authorization: Bearer`` with the first key of PARLEY_API_KEYS, when the app has keys (see ``--env``)."""
    pairs = os.environ.get("PARLEY_API_KEYS", "").replace(",", " ").split()
    return [(b"authorization", b"Bearer " + pairs[0].partition(":")[2].encode())] if pairs else []


KEY_HEADER = _key_header()  # the measured process gets --env in its environment


async def _call(app: Any, path: str, body: bytes = b"", accept: bytes = b"*/*") -> list[dict[str, Any]]:
    """One request through the app: the body arrives at once; a disconnect only after the response ends."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
            (b"accept", accept),
            *KEY_HEADER,
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    ended = asyncio.Event()
    body_sent = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            ended.set()

    await app(scope, receive, send)
    ended.set()
    return messages


async def _inner(kind: str, chats: int, words: int, concurrency: int, accept: bytes) -> None:
    os.environ["PARLEY_ECHO_DELAY"] = "0"
    # Checkpoints of a reply are timed (one a second): under valgrind, ~50 times slower, they would come ~50
    # times as often per token, and as often as the machine's load makes it. One a second is nothing per token.
    # A Redis claim's renewals are timed too (a third of its lease): the same, per chat.
    os.environ["PARLEY_CHECKPOINT_SECONDS"] = "3600"
    os.environ["PARLEY_REDIS_LEASE_SECONDS"] = "3600"
    # 64 chats at once, ~50 times slower, on a machine that may be loaded: one may wait its turn for a pooled
    # connection, or for its reply from Redis, longer than production's few seconds, and its reply may take longer
    # than a second to record (then it would be recorded after its response, in more round trips, and counted so).
    # Settings for the count only: nothing else is told apart by them.
    os.environ["PARLEY_REDIS_POOL_TIMEOUT_SECONDS"] = "600"
    os.environ["PARLEY_DATABASE_POOL_TIMEOUT_SECONDS"] = "600"
    os.environ["PARLEY_REDIS_SOCKET_TIMEOUT_SECONDS"] = "600"
    os.environ["PARLEY_RECORD_BEFORE_END_SECONDS"] = "600"
    os.environ["PARLEY_DATA_DIR"] = tempfile.mkdtemp(prefix="parley-instructions-")
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    # parley (and the floor, see bench/floor.py) with the garbage-collector settings `uvicorn app:app` applies, as
    # `make bench` runs them; the peer with CPython's defaults, as it runs there too.
    if kind == "parley":
        from parley import Settings, create_app

        app: Any = create_app(Settings.from_env(), owns_process=True)
    elif kind == "acting":
        from bench.acting import acting_app

        app = acting_app(logging_and_metrics=False)
    else:
        app = importlib.import_module(f"bench.{kind}").app
    await lifespan.put({"type": "lifespan.startup"})

    started = asyncio.Event()

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    running = asyncio.create_task(app(scope, lifespan.get, lifespan_send))
    # The peer opens its database at start-up; the floor has no lifespan at all (it returns at once).
    await asyncio.wait([running, asyncio.ensure_future(started.wait())], return_when=asyncio.FIRST_COMPLETED)
    sessions = [f"s{i}" for i in range(SESSIONS)]
    if kind != "floor":  # the peer keeps history too: it needs real sessions
        sessions = [json.loads((await _call(app, "/api/v1/sessions"))[1]["body"])["ui_session_id"] for _ in sessions]
    message = "+".join(["w"] * words)

    async def client(first: int, count: int) -> None:
        for k in range(count):
            session_id = sessions[(first + concurrency * k) % len(sessions)]
            body = f"ui_session_id={session_id}&message={message}".encode()
            answer = await _call(app, "/api/v1/chat", body, accept)
            assert answer[0]["status"] == 200, answer

    if kind == "acting":  # a server without the parts' frames would count something else: say so, count nothing
        body = f"ui_session_id={sessions[0]}&message=a+b".encode()
        seen = b"".join(m.get("body", b"") for m in await _call(app, "/api/v1/chat", body, accept)).replace(b" ", b"")
        if not any(frame in seen for frame in (b'"type":"reasoning-delta"', b'"type":"tool-output-available"')):
            sys.exit(FEATURE_MISSING)
    await asyncio.gather(*(client(i, WARM_UP) for i in range(concurrency)))  # every code path taken once
    await asyncio.gather(*(client(i, chats // concurrency) for i in range(concurrency)))
    await lifespan.put({"type": "lifespan.shutdown"})
    await running


def _count(kind: str, chats: int, words: int, concurrency: int, env: dict[str, str], accept: str = "*/*") -> int:
    command = [sys.executable, "-m", "bench.instructions", "--inner", kind, str(chats), str(words), str(concurrency)]
    command += [accept]
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if done.returncode != 0:  # the app's own error, not valgrind's summary, says why
        print("\n".join(done.stderr.splitlines()[-15:]), file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    refs = re.search(r"refs:\s+([\d,]+)", done.stderr)
    assert refs is not None, done.stderr
    return int(refs.group(1).replace(",", ""))


def per_token(kind: str, env: dict[str, str], accept: str = "*/*", words: tuple[int, int] = (2000, 1000)) -> int:
    """Instructions per streamed token (or per event of :mod:`bench.acting`'s agent): 64 chats of 2,000 words
    against 64 of 1,000, one at a time (the warm-up chats have as many words: they count too)."""
    counts = [_count(kind, 64, n, 1, env, accept) for n in words]
    return (counts[0] - counts[1]) // ((64 + WARM_UP) * (words[0] - words[1]))


@contextlib.contextmanager
def store_env(store: str) -> Iterator[Callable[[], dict[str, str]] | None]:
    """For each count on ``store``, the variables of a fresh place on it (a Redis database, a PostgreSQL database
    beside one), its servers started here; None when this machine lacks them."""
    if store == "sqlite":
        yield dict
        return
    with servers.redis_server() as redis, contextlib.ExitStack() as stack:
        postgres = stack.enter_context(servers.postgres_server()) if store == "postgres" else None
        if redis is None or not servers.has_redis_extra() or (store == "postgres" and postgres is None):
            yield None
            return
        databases = iter(range(1, 64))

        def fresh() -> dict[str, str]:
            assert redis is not None
            env = {"PARLEY_REDIS_URL": redis.url(next(databases))}
            if postgres is not None:
                env["PARLEY_DATABASE_URL"] = postgres.create_database()
            return env

        yield fresh


QUICK = False  # --quick: a tenth of the work, to check the code paths (the counts are then rougher)
STORES = {"sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL + Redis"}
TITLES = {"chat": "per short chat", "token": "per token", "sse": "per SSE token",
          "reasoning": "per reasoning token (SSE)", "tool": "per tool call (SSE)"}  # fmt: skip
SSE = "text/event-stream"


def count(kind: str, what: str, env: dict[str, str], fresh: Callable[[], dict[str, str]]) -> str:
    """One cell of the table: ``what`` for ``kind``, formatted; "—" where the app has no such thing."""
    scale = 10 if QUICK else 1
    if what == "chat":  # per one-word chat, 64 at a time (what make bench's short chats do)
        low, high = 640 // scale, 1920 // scale
        counts = [_count(kind, chats, 1, CONCURRENCY, {**env, **fresh()}) for chats in (high, low)]
        return f"{(counts[0] - counts[1]) // (high - low):,}"
    words, calls = (2000 // scale, 1000 // scale), (200 // scale, 100 // scale)
    if what == "token":
        return f"{per_token(kind, env, words=words):,}"
    if kind != "parley":  # only parley speaks SSE, and only it has agents that act
        return "—"
    if what == "sse":
        return f"{per_token(kind, env, SSE, words):,}"
    try:
        if what == "reasoning":
            return f"{per_token('acting', {**env, 'BENCH_ACTING': 'reasoning'}, SSE, words):,}"
        return f"{per_token('acting', {**env, 'BENCH_ACTING': 'tools'}, SSE, calls):,}"
    except subprocess.CalledProcessError as failed:
        if failed.returncode == FEATURE_MISSING:
            return "n/a (feature missing)"
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="floor,parley,peer")
    parser.add_argument("--what", default="chat,token,sse,reasoning,tool", help=", ".join(TITLES))
    parser.add_argument("--stores", default="sqlite,redis,postgres", help="parley's chat on: " + ", ".join(STORES))
    parser.add_argument("--quick", action="store_true", help="a tenth of the work: to check that every count runs")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set for the app")
    parser.add_argument(
        "--inner", nargs=5, metavar=("KIND", "CHATS", "WORDS", "CONCURRENCY", "ACCEPT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.inner:
        kind, chats, words, concurrency, accept = args.inner
        asyncio.run(_inner(kind, int(chats), int(words), int(concurrency), accept.encode()))
        return
    global QUICK
    QUICK = args.quick
    env = dict(item.split("=", 1) for item in args.env)
    what = args.what.split(",")
    stores = args.stores.split(",")
    unknown = set(what) - set(TITLES) | set(stores) - set(STORES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    print("| app | " + " | ".join(f"instructions {TITLES[name]}" for name in what) + " |")
    print("| --- |" + " --- |" * len(what), flush=True)
    for kind in args.only.split(","):
        # parley's first row is on SQLite with every figure; then one row per other store, with its chats only.
        places = [store for store in ["sqlite", *stores] if kind == "parley" or store == "sqlite"]
        for index, store in enumerate(dict.fromkeys(places)):
            with store_env(store) as fresh:
                label = " ".join([kind, *args.env]) + (f" ({STORES[store]})" if kind == "parley" else "")
                if fresh is None:
                    cells = ["n/a (no server on this machine)" if name == "chat" else "—" for name in what]
                else:
                    cells = [count(kind, name, env, fresh) if index == 0 or name == "chat" else "—" for name in what]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
