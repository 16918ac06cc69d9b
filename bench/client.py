"""A lean load generator for streams: raw asyncio protocols, one connection per stream, a timestamp per read.

Streaming replies have to be timed token by token, which wrk cannot do; a Python client can, if it
does no more than record when bytes arrive. It runs pinned to its own core (see run.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

T = TypeVar("T")

TERMINATOR = b"0\r\n\r\n"


def form_post(
    path: str, fields: dict[str, str], port: int, keep_alive: bool = False, headers: dict[str, str] | None = None
) -> bytes:
    body = urlencode(fields).encode()
    extra = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body)), **(headers or {})}
    return raw_request("POST", path, port, extra, keep_alive) + body


def raw_request(
    method: str, path: str, port: int, headers: dict[str, str] | None = None, keep_alive: bool = False
) -> bytes:
    """A request's head, byte for byte (a body, if any, goes after it)."""
    connection = "keep-alive" if keep_alive else "close"
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Connection: {connection}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Stream:
    sent_at: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    ended_at: float | None = None
    status: int | None = None
    size: int = 0
    tail: bytes = b""
    head_done: bool = False
    first_body_at: float | None = None  # when the first byte after the response's head arrived
    first_body: bytes = b""  # what came with it
    body_started: asyncio.Event = field(default_factory=asyncio.Event)
    everything: bytearray | None = None  # every byte received (head included), when asked for


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, stream: Stream, first: asyncio.Event, done: asyncio.Future[Stream]) -> None:
        self.request = request
        self.stream = stream
        self.first = first
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are no subclass of it
        self.stream.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        stream = self.stream
        if stream.status is None:
            stream.status = int(data[9:12])
        if data != TERMINATOR:  # the end of the body is no token: only tokens' arrivals are timed
            stream.arrivals.append(now)
        stream.size += len(data)
        if stream.everything is not None:
            stream.everything += data
        if stream.first_body_at is None:
            body = data
            if not stream.head_done:
                _, found, body = (stream.tail + data).partition(b"\r\n\r\n")
                stream.head_done = bool(found)
            if stream.head_done and body:
                stream.first_body_at, stream.first_body = now, body
                stream.body_started.set()
        stream.tail = (stream.tail + data)[-16:]
        if not self.first.is_set():
            self.first.set()
        if stream.tail.endswith(TERMINATOR) or (stream.status != 200 and stream.status is not None):
            stream.ended_at = now
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream.ended_at is None:
            self.stream.ended_at = time.perf_counter()
        self.stream.body_started.set()  # no body is coming: wake whoever waits for one
        if not self.done.done():
            self.done.set_result(self.stream)


async def open_stream(
    port: int, request: bytes, keep: bool = False
) -> tuple[Stream, asyncio.Event, asyncio.Future[Stream]]:
    """Send ``request`` on a new connection; the stream records its reads (and keeps every byte with ``keep``)."""
    loop = asyncio.get_running_loop()
    stream, first, done = Stream(everything=bytearray() if keep else None), asyncio.Event(), loop.create_future()
    await loop.create_connection(lambda: _StreamProtocol(request, stream, first, done), "127.0.0.1", port)
    return stream, first, done


async def request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read()
    writer.close()
    return data


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the client on uvloop when it is there (it comes with parley): thousands of streams' reads cost the
    client less, so its core stays further from being the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
