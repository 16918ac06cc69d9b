from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from parley.agents.event_stream import sse_data

pytestmark = pytest.mark.anyio

STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"a": 1}\r\n\r\n'
    b"event: ignored\nid: 7\ndata: line one\ndata:line two\n\n"
    b"data: caf\xc3\xa9\r\r"
    b"retry: 10\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = ['{"a": 1}', "line one\nline two", "café", "[DONE]"]


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def collect(data: bytes, size: int) -> list[str]:
    return [event async for event in sse_data(chunks(data, size))]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
async def test_events_survive_any_cut_into_reads(size: int) -> None:
    assert await collect(STREAM, size) == EXPECTED


async def test_a_stream_without_the_final_blank_line_still_delivers_its_last_event() -> None:
    assert await collect(b"data: one\n\ndata: two", 4) == ["one", "two"]
    assert await collect(b"data: last\r", 100) == ["last"]


async def test_comments_and_empty_streams_deliver_nothing() -> None:
    assert await collect(b": ping\n\n: ping\n\n", 3) == []
    assert await collect(b"", 3) == []
