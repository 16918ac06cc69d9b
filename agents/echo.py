from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial

import anyio
import anyio.lowlevel

from agents.base import Turn

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
        pause = partial(anyio.sleep, self.delay) if self.delay else _checkpoint()
        for token in _TOKEN.findall(text):
            # Even with no delay, pause at a checkpoint: a fast echo still lets a cancel in between tokens.
            await pause()
            yield token


def _checkpoint() -> Callable[[], Awaitable[None]]:
    """The cheapest checkpoint of the running event loop (anyio's generic one costs a backend lookup per call)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.lowlevel.checkpoint
    return partial(asyncio.sleep, 0)
