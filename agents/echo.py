from __future__ import annotations

import re
from collections.abc import AsyncGenerator

from parley.agents.base import Turn, pace
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
        pause = pace(self.delay)
        for token in _TOKEN.finditer(text):  # (one at a time: a stream does not hold its every token from the start)
            await pause()
            yield token.group()


def from_settings(settings: Settings) -> EchoAgent:
    """Always there: the embedded default (PARLEY_ECHO_DELAY slows it down)."""
    return EchoAgent(delay=settings.echo_delay)
