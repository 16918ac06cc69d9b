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
        # One token at a time (a stream does not hold its every token from the start), each matched where the last
        # one ended: an iterator over the matches would keep ~1.5 KiB of the matcher's state for the whole reply.
        position, end, match = 0, len(text), _TOKEN.match
        while position < end:
            token = match(text, position).group()  # type: ignore[union-attr]  # (it matches wherever text is left)
            position += len(token)
            await pause()
            yield token


def from_settings(settings: Settings) -> EchoAgent:
    """Always there: the embedded default (PARLEY_ECHO_DELAY slows it down)."""
    return EchoAgent(delay=settings.echo_delay)
