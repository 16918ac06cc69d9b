"""Benchmarks 4, 5, 6 and 10, one request at a time: cancel → stream end, rejoin → first replayed byte, what
parley's ``openai`` agent adds to a model's first token, and a busy session's ``interrupt`` and ``enqueue``."""

from __future__ import annotations

import asyncio
import json
import re
import time

from bench.client import Stream, form_post, open_stream, percentile, raw_request, request, run
from bench.servers import Server

LONG = " ".join(f"c{i}" for i in range(400))  # 8 s at 50 tokens/s: a reply never ends before its cancel
SHORT = "one two three"  # 60 ms at 50 tokens/s: the reply a queued message waits for
PACED = "pace=0.02 "  # bench.acting's agent: this reply at 50 tokens/s, the server's others at once
SSE = {"Accept": "text/event-stream"}
_STAMP = re.compile(rb"T(\d+\.\d+)T")


class Missing(Exception):
    """The server under test does not have the feature a figure measures (an older branch): the figure is n/a."""


def p50_p99(values: list[float]) -> tuple[float, float]:
    return percentile(values, 50) * 1000, percentile(values, 99) * 1000


async def _cancel(server: Server, session_id: str) -> bytes:
    return await request(server.port, form_post("/api/v1/cancel", {"ui_session_id": session_id}, server.port))


async def _cancels(owner: Server, canceller: Server, sessions: list[str]) -> list[float]:
    latencies = []
    for session_id in sessions:
        chat = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": LONG}, owner.port)
        stream, first, done = await open_stream(owner.port, chat)
        await first.wait()
        cancel = form_post("/api/v1/cancel", {"ui_session_id": session_id}, canceller.port)
        started = time.perf_counter()
        answer = asyncio.ensure_future(request(canceller.port, cancel))
        await done
        assert stream.ended_at is not None
        latencies.append(stream.ended_at - started)
        reply = await answer
        assert b'"cancelled":true' in reply, reply
    return latencies


def cancel_latency(owner: Server, canceller: Server, count: int) -> tuple[float, float]:
    """From sending POST /api/v1/cancel (to ``canceller``) to the client seeing the stream end (from ``owner``)."""
    return p50_p99(run(_cancels(owner, canceller, owner.sessions(count))))


async def _rejoins(owner: Server, rejoiner: Server, sessions: list[str]) -> list[float]:
    latencies = []
    for session_id in sessions:
        fields = {"ui_session_id": session_id, "message": LONG, "on_disconnect": "continue"}
        _, first, done = await open_stream(owner.port, form_post("/api/v1/chat", fields, owner.port))
        await first.wait()
        path = f"/api/v1/chat/{session_id}/stream"
        rejoin = raw_request("GET", path, rejoiner.port, {"Accept": "text/event-stream", **rejoiner.headers})
        joined, _, rejoin_done = await open_stream(rejoiner.port, rejoin)
        await joined.body_started.wait()
        await _cancel(owner, session_id)
        await asyncio.wait_for(asyncio.gather(done, rejoin_done), 30)
        if joined.status != 200 or joined.first_body_at is None:
            raise Missing(f"GET /api/v1/chat/{{ui_session_id}}/stream answered {joined.status}")
        latencies.append(joined.first_body_at - joined.sent_at)
    return latencies


def rejoin_latency(owner: Server, rejoiner: Server, count: int) -> tuple[float, float]:
    """From sending GET /api/v1/chat/{id}/stream (to ``rejoiner``) to the first replayed byte, for a reply running
    on ``owner`` with on_disconnect=continue."""
    return p50_p99(run(_rejoins(owner, rejoiner, owner.sessions(count))))


def _stamped_delay(body: bytes, arrived: float | None) -> float:
    stamp = _STAMP.search(body)
    if stamp is None or arrived is None:
        raise Missing(f"no stamped token in {body[:200]!r}")
    return arrived - float(stamp.group(1))


async def _first_tokens(parley: Server, stub: Server, sessions: list[str]) -> tuple[list[float], list[float]]:
    payload = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    direct_head = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
    through, direct = [], []
    for session_id in sessions:
        chat = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": "hi"}, parley.port)
        stream, _, done = await open_stream(parley.port, chat)
        await done
        if stream.status != 200:
            raise Missing(f"parley's openai agent answered {stream.status}")
        through.append(_stamped_delay(stream.first_body, stream.first_body_at))
        raw = raw_request("POST", "/v1/chat/completions", stub.port, direct_head) + payload
        stream, _, done = await open_stream(stub.port, raw)
        await done
        direct.append(_stamped_delay(stream.first_body, stream.first_body_at))
    return through, direct


def first_token_overhead(parley: Server, stub: Server, count: int, warm_up: int = 20) -> dict[str, float]:
    """The stub model server's first token (stamped with its clock as it is sent) to the client's first byte of
    it, through parley's openai agent and straight from the stub; the overhead is the difference."""
    sessions = parley.sessions(count + warm_up, agent="openai")
    through, direct = run(_first_tokens(parley, stub, sessions))
    through, direct = through[warm_up:], direct[warm_up:]
    (t50, t99), (d50, d99) = p50_p99(through), p50_p99(direct)
    return {"through p50": t50, "through p99": t99, "direct p50": d50, "direct p99": d99,
            "overhead p50": t50 - d50, "overhead p99": t99 - d99}  # fmt: skip


def _busy_answer(stream: Stream, policy: str) -> None:
    if stream.status in (400, 404, 409, 422):  # an older server: no if_busy (400), or a busy session refused (409)
        raise Missing(f"if_busy={policy} answered {stream.status}")
    if stream.status != 200 or stream.first_body_at is None:
        raise RuntimeError(f"if_busy={policy} answered {stream.status} with no body")


async def _interrupts(owner: Server, interrupter: Server, sessions: list[str]) -> list[float]:
    latencies = []
    for session_id in sessions:
        chat = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": PACED + LONG}, owner.port)
        _, first, done = await open_stream(owner.port, chat)
        await first.wait()
        fields = {"ui_session_id": session_id, "message": "hi", "if_busy": "interrupt"}
        new, _, new_done = await open_stream(
            interrupter.port, form_post("/api/v1/chat", fields, interrupter.port, headers=SSE)
        )
        await asyncio.wait_for(asyncio.gather(done, new_done), 30)
        _busy_answer(new, "interrupt")
        assert new.first_body_at is not None
        latencies.append(new.first_body_at - new.sent_at)
    return latencies


def interrupt_latency(owner: Server, interrupter: Server, count: int) -> tuple[float, float]:
    """From sending a chat with ``if_busy=interrupt`` (to ``interrupter``) into a session whose reply runs (on
    ``owner``) to the new reply's first byte: the old reply stopped and recorded, the new one begun, its first
    token sent. Both servers run :mod:`bench.acting`'s agent, the old reply paced, the new one at once."""
    return p50_p99(run(_interrupts(owner, interrupter, owner.sessions(count))))


async def _enqueued(server: Server, sessions: list[str]) -> list[float]:
    latencies = []
    for session_id in sessions:
        chat = form_post("/api/v1/chat", {"ui_session_id": session_id, "message": PACED + SHORT}, server.port)
        running, first, done = await open_stream(server.port, chat)
        await first.wait()
        fields = {"ui_session_id": session_id, "message": "hi", "if_busy": "enqueue"}
        queued, _, queued_done = await open_stream(
            server.port, form_post("/api/v1/chat", fields, server.port, headers=SSE)
        )
        await asyncio.wait_for(asyncio.gather(done, queued_done), 30)
        _busy_answer(queued, "enqueue")
        assert queued.first_body_at is not None and running.ended_at is not None
        if queued.first_body_at < running.ended_at:  # it ran at once: the first reply was over before it came
            raise RuntimeError("the queued message did not wait (the reply before it ended too soon)")
        latencies.append(queued.first_body_at - running.ended_at)
    return latencies


def enqueue_latency(server: Server, count: int) -> tuple[float, float]:
    """From the end of a reply (its client sees the stream end) to the first byte of the message queued behind
    it with ``if_busy=enqueue``, in one process (:mod:`bench.acting`'s agent: the first reply paced, the queued
    one at once)."""
    return p50_p99(run(_enqueued(server, server.sessions(count))))
