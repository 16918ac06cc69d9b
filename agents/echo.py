from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable

import anyio

from parley.agents.base import Turn
from parley.settings import Settings

# A token is a word with the whitespace that follows it; leading whitespace rides on the first word.
_TOKEN = re.compile(r"\s*\S+\s*|\s+")


class EchoAgent:
    """Replies with the user's message, one word per token: the embedded default, and a test double
    that is not a mock (it streams, it can be slowed down, it can be cancelled)."""

    name = "echo"
    description = "Echoes your message back, one word at a time."
    history_limit = 0

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        text = turn.message + "".join(f"\n[file: {f.filename}, {f.size} bytes]" for f in turn.files)
        sleep, delay = _sleep(), self.delay
        for token in _TOKEN.findall(text):
            # Even with no delay, pause at a checkpoint: a fast echo still lets a cancel in between tokens.
            await sleep(delay)
            yield token


def _sleep() -> Callable[[float], Awaitable[None]]:
    """The cheapest sleep of the running event loop: anyio's generic one looks its backend up on every
    call, which is a real share of the cost of a token. (Sleeping 0 s is still a checkpoint.)"""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.sleep
    return asyncio.sleep


def from_settings(settings: Settings) -> EchoAgent:
    """Always there: the embedded default (PARLEY_ECHO_DELAY slows it down)."""
    return EchoAgent(delay=settings.echo_delay)
