from __future__ import annotations

import time

import pytest

from parley.agents import Attachment, EchoAgent, Turn

pytestmark = pytest.mark.anyio


async def tokens(agent: EchoAgent, turn: Turn) -> list[str]:
    return [token async for token in agent.reply(turn)]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("hello world", ["hello ", "world"]),
        ("  lead and trail  ", ["  lead ", "and ", "trail  "]),
        ("tabs\tand\nnewlines\n", ["tabs\t", "and\n", "newlines\n"]),
        ("one", ["one"]),
        ("héllo wörld ✓", ["héllo ", "wörld ", "✓"]),
    ],
)
async def test_echo_replies_word_by_word(message: str, expected: list[str]) -> None:
    result = await tokens(EchoAgent(), Turn("s", message))
    assert result == expected
    assert "".join(result) == message


async def test_echo_lists_attached_files() -> None:
    files = [Attachment("a.txt", "text/plain", 12, "hello"), Attachment("b.png", "image/png", 3)]
    reply = "".join(await tokens(EchoAgent(), Turn("s", "see", files=files)))
    assert reply == "see\n[file: a.txt, 12 bytes]\n[file: b.png, 3 bytes]"


async def test_echo_delay_paces_the_tokens() -> None:
    start = time.monotonic()
    await tokens(EchoAgent(delay=0.02), Turn("s", "a b c d e"))
    assert time.monotonic() - start >= 0.1
